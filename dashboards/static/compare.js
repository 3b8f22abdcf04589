// Several campaigns side by side: their fronts over one plot, and the architectures they share
// (same arch_hash) with the latency each target measured.
"use strict";

(async () => {
  const { el, plotlyText, fmt, getJSON, campaignUrl, hover, openTrial } = VN;
  const COLOURS = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#17becf", "#8c564b", "#e377c2"];
  const refs = new URLSearchParams(location.search).getAll("c");
  let data;
  try {
    data = await getJSON(`/api/compare?${new URLSearchParams(refs.map(r => ["c", r]))}`);
  } catch (error) {
    VN.showError(error);
    return;
  }
  const cs = data.campaigns;
  const colour = i => COLOURS[i % COLOURS.length];
  const label = c => `${c.campaign.name} (${c.campaign.target || "?"})`;
  document.getElementById("legend").replaceChildren(...cs.map((c, i) =>
    el("li", { style: `border-left: 1.2em solid ${colour(i)}` },
      el("a", { href: campaignUrl(c.campaign.ref), text: c.campaign.name }),
      el("span", { text: ` · target ${c.campaign.target || "?"} · space ${c.campaign.space || "?"} · ${c.points.length} trials · ${c.front.length} on the front` }))));
  document.getElementById("space-note").hidden = data.same_space;

  const traces = [];
  cs.forEach((c, i) => {
    const byRun = new Map(c.points.map(p => [p.run_id, p]));
    const front = c.front.map(id => byRun.get(id));
    const xy = ps => ({ x: ps.map(p => p.latency_ms), y: ps.map(p => p.val_accuracy),
      customdata: ps.map(p => p.run_id), text: ps.map(p => hover(p, c.campaign.name)), hovertemplate: "%{text}<extra></extra>" });
    traces.push({ type: "scatter", mode: "markers", name: plotlyText(`${label(c)}: trials`), legendgroup: String(i),
      marker: { color: colour(i), size: 6, opacity: 0.3 }, ...xy(c.points) });
    traces.push({ type: "scatter", mode: "lines+markers", name: plotlyText(`${label(c)}: front`), legendgroup: String(i),
      line: { shape: "hv", color: colour(i), width: 2 }, marker: { color: colour(i), size: 9 }, ...xy(front) });
  });
  const fronts = document.getElementById("fronts");
  await Plotly.newPlot(fronts, traces, {
    xaxis: { title: { text: "latency (ms, measured on each campaign's target)" } },
    yaxis: { title: { text: "validation accuracy" } }, hovermode: "closest", template: "plotly_white",
    margin: { t: 30, r: 10 }, legend: { orientation: "h", y: -0.2 },
  }, { responsive: true, displaylogo: false });
  fronts.on("plotly_click", event => openTrial(event.points[0].customdata));

  drawShared(data.shared);
  VN.ready();

  function drawShared(shared) {
    document.getElementById("shared-count").textContent =
      `${shared.length} architectures finished in two or more of these campaigns`;
    const head = el("tr", {}, el("th", { text: "arch" }),
      cs.map((c, i) => el("th", { style: `border-top: 4px solid ${colour(i)}`, text: c.campaign.name })));
    const rows = shared.map(s => el("tr", { dataset: { arch: s.arch_hash } }, el("td", { class: "mono", text: s.arch_hash }),
      s.runs.map(p => p === null ? el("td", { text: "–" }) : el("td", { class: "num", dataset: { runId: p.run_id } },
        el("button", { type: "button", class: "link", text: `trial ${p.trial_number}`, onclick: () => openTrial(p.run_id) }),
        ` ${fmt(p.latency_ms)} ms · acc ${fmt(p.val_accuracy, 4)}`))));
    document.getElementById("shared").replaceChildren(el("thead", {}, head), el("tbody", {}, rows));

    // latency of the same architecture: first campaign (x) against each other one (y)
    const box = document.getElementById("shared-plot");
    box.hidden = shared.length === 0;
    if (box.hidden) return;
    const lines = cs.slice(1).map((c, k) => {
      const both = shared.filter(s => s.runs[0] && s.runs[k + 1]);
      return { type: "scatter", mode: "markers", name: plotlyText(label(c)), marker: { color: colour(k + 1), size: 9 },
        x: both.map(s => s.runs[0].latency_ms), y: both.map(s => s.runs[k + 1].latency_ms),
        customdata: both.map(s => s.runs[k + 1].run_id),
        text: both.map(s => `arch ${plotlyText(s.arch_hash)}<br>${fmt(s.runs[0].latency_ms)} ms → ${fmt(s.runs[k + 1].latency_ms)} ms`),
        hovertemplate: "%{text}<extra></extra>" };
    });
    const all = shared.flatMap(s => s.runs.filter(Boolean).map(p => p.latency_ms));
    const lo = Math.min(...all), hi = Math.max(...all);
    lines.push({ type: "scatter", mode: "lines", name: "same latency", x: [lo, hi], y: [lo, hi],
      line: { dash: "dot", color: "#999" }, hoverinfo: "skip" });
    Plotly.newPlot(box, lines, {
      xaxis: { title: { text: plotlyText(`latency on ${label(cs[0])} (ms)`) } },
      yaxis: { title: { text: "latency on the other target (ms)" } }, template: "plotly_white",
      margin: { t: 30, r: 10 }, legend: { orientation: "h", y: -0.25 }, hovermode: "closest",
    }, { responsive: true, displaylogo: false });
    box.on("plotly_click", event => event.points[0].customdata && openTrial(event.points[0].customdata));
  }
})();
