"""The Pareto-front explorer: ``vitnas dashboard`` serves it (standard-library HTTP, plotly.js from the
installed package, read-only MLflow access). Installed as ``nas.dashboards``."""
