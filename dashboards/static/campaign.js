// One campaign: every trial a point (colour GFLOPs, size params, a cross where the latency was noisy),
// the front as a staircase, a latency-budget slider that moves the star onto the best architecture
// under it, a click opens it.
"use strict";

(async () => {
  const { el, fmt, getJSON, bestUnder, hover, openTrial } = VN;
  const [, , experiment, name] = location.pathname.split("/").map(decodeURIComponent);
  const BEST = 2;  // the star's trace

  let data;
  try {
    data = await getJSON(`/api/campaigns/${encodeURIComponent(experiment)}/${encodeURIComponent(name)}/trials`);
  } catch (error) {
    VN.showError(error);
    return;
  }
  const c = data.campaign;
  const points = data.points;
  const byRun = new Map(points.map(p => [p.run_id, p]));
  const front = data.front.map(id => byRun.get(id));
  document.title = `${c.name} · vitnas`;
  document.getElementById("title").textContent = c.name;
  document.getElementById("meta").replaceChildren(el("span", {},
    el("span", { text: `target ${c.target || "?"}` }), " · ",
    el("span", { text: `space ${c.space || "?"}` }), " · ",
    el("span", { text: `experiment ${c.experiment}` }), " · ",
    el("span", { id: "count", text: `${points.length} trials plotted` }),
    data.not_plotted ? el("span", { text: ` (${data.not_plotted} not finished or without latency)` }) : null, " · ",
    el("span", { id: "front-size", text: `${front.length} on the front` }), " · ",
    el("span", { text: c.budget_ms === null ? "no budget" : `campaign budget ${c.budget_ms} ms` }),
    // how far the accuracies drawn here rank as training from scratch would (vitnas rank-check)
    data.supernet ? " · " : null,
    data.supernet ? el("span", { id: "ranking", title: "Kendall tau between inherited-weight and stand-alone accuracy, 90 % interval (vitnas rank-check)",
      text: data.ranking ? data.ranking.summary : "ranking trust not measured (vitnas rank-check)" }) : null));

  const params = points.map(p => p.params_m ?? 0);
  const maxParams = Math.max(...params, 1e-9);
  // colour by GFLOPs over the range the trials span; without that metric one colour and no colour
  // bar (plotly would draw one around nothing, from -0.4 to 0.4)
  const flops = points.map(p => p.gflops).filter(v => typeof v === "number" && Number.isFinite(v));
  const colour = flops.length
    ? { color: points.map(p => p.gflops ?? null), colorscale: "Viridis", showscale: true,
        cmin: Math.min(...flops), cmax: Math.max(...flops), colorbar: { title: { text: "GFLOPs" } } }
    : { color: "#30638e", showscale: false };
  const plot = document.getElementById("plot");
  const trace = (ps, style) => ({
    type: "scatter", x: ps.map(p => p.latency_ms), y: ps.map(p => p.val_accuracy),
    customdata: ps.map(p => p.run_id), text: ps.map(p => hover(p)),
    hovertemplate: "%{text}<extra></extra>", ...style,
  });
  await Plotly.newPlot(plot, [
    trace(points, {
      name: "trials", mode: "markers",
      marker: {
        ...colour, size: params, sizemode: "area",
        symbol: points.map(p => (p.latency_noisy === 1 ? "x" : "circle")),  // a noisy latency, ranked with care
        sizeref: 2 * maxParams / (points.length > 1000 ? 14 : 22) ** 2, sizemin: 3, opacity: 0.85, line: { width: 0.5, color: "#333" },
      },
    }),
    trace(front, {
      name: "Pareto front", mode: "lines+markers", line: { shape: "hv", color: "#d1495b", width: 2 },
      marker: { symbol: "circle-open", size: 13, color: "#d1495b", line: { width: 2 } },
    }),
    trace([], { name: "best under budget", mode: "markers",
      marker: { symbol: "star", size: 22, color: "#edae49", line: { width: 1.5, color: "#000" } } }),
  ], {
    xaxis: { title: { text: "latency (ms, measured on the target)" } },
    yaxis: { title: { text: "validation accuracy" } },
    hovermode: "closest", template: "plotly_white", margin: { t: 30, r: 10 },
    legend: { orientation: "h", y: -0.18, itemsizing: "constant" },
  }, { responsive: true, displaylogo: false });
  plot.on("plotly_click", event => openTrial(event.points[0].customdata));

  // -- the budget slider --
  const slider = document.getElementById("budget");
  const lats = points.map(p => p.latency_ms).concat(c.budget_ms ?? []);  // the budget may lie outside the points
  const lo = Math.min(...lats), hi = Math.max(...lats);
  slider.min = lo; slider.max = hi; slider.step = "any";  // the budget exactly; keys move by 1 % and 10 %
  slider.value = c.budget_ms ?? hi;
  slider.disabled = points.length === 0;

  function moveBudget() {
    const budget = Number(slider.value);
    const best = bestUnder(points, budget);
    document.getElementById("budget-value").textContent = `${fmt(budget)} ms`;
    const out = document.getElementById("best");
    out.dataset.budget = String(budget);
    out.dataset.runId = best ? best.run_id : "";
    out.replaceChildren(best
      ? el("span", {}, "best under it: ", el("button", { type: "button", class: "link", text: `trial ${best.trial_number}`,
          onclick: () => openTrial(best.run_id) }), ` · accuracy ${fmt(best.val_accuracy, 4)} · ${fmt(best.latency_ms)} ms`)
      : el("span", { text: "no architecture is that fast" }));
    Plotly.restyle(plot, { x: [best ? [best.latency_ms] : []], y: [best ? [best.val_accuracy] : []],
      customdata: [best ? [best.run_id] : []], text: [best ? [hover(best)] : []] }, [BEST]);
    Plotly.relayout(plot, { shapes: [{ type: "line", x0: budget, x1: budget, yref: "paper", y0: 0, y1: 1,
      line: { dash: "dash", color: "#30638e", width: 1.5 } }] });
  }
  slider.addEventListener("input", moveBudget);
  moveBudget();
  VN.ready();
})();
