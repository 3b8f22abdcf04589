// Shared by every page: DOM building (text only, never markup from data), API calls, number
// formats, and the trial panel with its architecture drawing.
"use strict";

const VN = (() => {
  /** An element; strings among the children become text nodes, never markup. */
  function el(tag, props = {}, ...children) {
    const node = document.createElement(tag);
    for (const [key, value] of Object.entries(props)) {
      if (value === undefined || value === null || value === false) continue;
      if (key === "class") node.className = value;
      else if (key === "text") node.textContent = String(value);
      else if (key === "dataset") Object.assign(node.dataset, value);
      else if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
      else node.setAttribute(key, value);
    }
    for (const child of children.flat(Infinity)) {
      if (child !== null && child !== undefined && child !== false) node.append(child);
    }
    return node;
  }

  /** Plotly renders hover text, names and titles as pseudo-HTML: escape data before handing it over. */
  function plotlyText(value) {
    return String(value).replace(/&/g, "&amp;").replace(/</g, "&lt;").replace(/>/g, "&gt;");
  }

  function fmt(value, digits = 3) {
    return typeof value === "number" && Number.isFinite(value) ? value.toFixed(digits) : "–";
  }

  async function getJSON(url) {
    const response = await fetch(url, { headers: { Accept: "application/json" } });
    const body = await response.json().catch(() => ({}));
    if (!response.ok) throw new Error(body.error || `${response.status} ${response.statusText}`);
    return body;
  }

  /** A campaign's ref is "<experiment id>/<name>"; the name may hold any character. */
  function splitRef(ref) {
    const cut = ref.indexOf("/");
    return [ref.slice(0, cut), ref.slice(cut + 1)];
  }

  function campaignUrl(ref) {
    const [experiment, name] = splitRef(ref);
    return `/campaigns/${encodeURIComponent(experiment)}/${encodeURIComponent(name)}`;
  }

  function showError(error) {
    const box = document.getElementById("error");
    box.textContent = String(error.message || error);
    box.hidden = false;
    document.body.dataset.ready = "error";
  }

  function ready() {
    document.body.dataset.ready = "1";
  }

  /** The most accurate point within the budget; ties: faster, then earlier (points by trial number). */
  function bestUnder(points, budget) {
    let best = null;
    for (const p of points) {
      if (p.latency_ms > budget) continue;
      if (best === null || p.val_accuracy > best.val_accuracy ||
          (p.val_accuracy === best.val_accuracy && p.latency_ms < best.latency_ms)) best = p;
    }
    return best;
  }

  /** Hover text of a point, every piece of data escaped. */
  function hover(p, campaign) {
    const lines = [];
    if (campaign) lines.push(`<b>${plotlyText(campaign)}</b>`);
    lines.push(`<b>${plotlyText(p.run_name)}</b> · trial ${p.trial_number}`,
      `arch ${plotlyText(p.arch_hash)}`,
      `accuracy ${fmt(p.val_accuracy, 4)}`,
      `latency ${fmt(p.latency_ms)} ms (p90 ${fmt(p.latency_p90_ms)})`,
      `GFLOPs ${fmt(p.gflops, 4)} · params ${fmt(p.params_m)} M`);
    if (p.latency_noisy === 1) lines.push("<b>noisy latency</b>: still spread after re-measuring; rank with care");
    return lines.join("<br>");
  }

  // -- the trial panel --------------------------------------------------------------------------
  async function openTrial(runId) {
    const panel = document.getElementById("panel");
    panel.dataset.state = "loading";
    try {
      const detail = await getJSON(`/api/trials/${encodeURIComponent(runId)}`);
      panel.replaceChildren(...trialPanel(detail));
      panel.dataset.runId = detail.run_id;
      panel.dataset.state = "ready";
    } catch (error) {
      panel.replaceChildren(el("p", { class: "error", text: String(error.message || error) }));
      panel.dataset.state = "error";
    }
  }

  function copyButton(source) {
    return el("button", {
      type: "button", class: "copy", text: "copy",
      onclick: async (event) => {
        try {
          await navigator.clipboard.writeText(source.textContent);
          event.target.textContent = "copied";
        } catch {
          window.getSelection().selectAllChildren(source);  // no clipboard access: select it for Ctrl-C
        }
      },
    });
  }

  function trialPanel(d) {
    const metrics = el("table", { class: "numbers", id: "trial-metrics" },
      Object.entries(d.metrics).map(([k, v]) =>
        el("tr", { dataset: { metric: k } }, el("th", { text: k }), el("td", { text: fmt(v, 4) }))));
    const tags = el("dl", { class: "tags" },
      Object.entries(d.tags).map(([k, v]) => [el("dt", { text: k }), el("dd", { text: v })]));
    const command = el("pre", { id: "export-command", class: "command", text: d.export_command });
    return [
      el("h2", { id: "trial-title" }, trialTitle(d)),
      el("p", { class: "sub" }, el("span", { text: `run ${d.run_id}` }), " · ",
        el("span", { text: `arch ${d.arch_hash}` }), " · ", el("span", { text: d.status })),
      metrics,
      tags,
      el("h3", { text: "architecture" }),
      d.arch ? drawArch(d.arch) : el("p", { class: "error", text: d.arch_error }),
      el("h3", { text: "export" }),
      el("div", { class: "command-row" }, command, copyButton(command)),
      el("h3", { text: "MLflow run" }),
      mlflowLink(d.mlflow),
      d.arch_yaml ? el("details", {}, el("summary", { text: "arch.yaml" }), el("pre", { text: d.arch_yaml })) : null,
    ];
  }

  /** "trial 12", and the run's name only when it says more: vitnas names trial runs "trial-12". */
  function trialTitle(d) {
    const number = d.trial_number === "" ? null : `trial ${d.trial_number}`;
    const name = d.run_name && d.run_name !== `trial-${d.trial_number}` ? d.run_name : null;
    if (number === null) return el("span", { id: "trial-name", text: name ?? `run ${d.run_id}` });
    return name === null ? number : [number, " · ", el("span", { id: "trial-name", text: name })];
  }

  function mlflowLink(link) {
    if (link.url) {
      return el("p", {}, el("a", { id: "mlflow-link", href: link.url, target: "_blank", rel: "noopener noreferrer",
        text: "open the run in MLflow" }));
    }
    const command = el("pre", { id: "mlflow-command", class: "command", text: link.command });
    return el("div", {}, el("p", { text: "a database store has no web UI of its own: start one, then open the run at" }),
      el("div", { class: "command-row" }, command, copyButton(command)),
      el("p", { class: "url" }, "http://127.0.0.1:5000/", el("span", { id: "mlflow-path", text: link.path })));
  }

  // -- the architecture drawing -----------------------------------------------------------------
  function drawArch(a) {
    if (a.family === "timm" || a.family === "adaptive") {
      return el("div", { class: "arch", id: "arch" },
        el("div", { class: "arch-block", text: `timm ${a.model} · ${a.image_size} px · ${a.num_classes} classes` }),
        el("pre", { text: JSON.stringify(a.schedule, null, 1) }));
    }
    const most = a.grid * a.grid + 1;
    const parts = [el("div", { class: "arch-block embed" },
      el("b", { text: "patch embed" }),
      el("span", { text: `${a.image_size}×${a.image_size} px, ${a.patch_size}×${a.patch_size} patches` }),
      el("span", { text: `${a.grid}×${a.grid} + cls = ${most} tokens` }))];
    for (const s of a.stages) {
      const into = s.pool ? `${s.pool} pooling: ${s.tokens_before} → ${s.tokens} tokens` : `${s.tokens} tokens`;
      parts.push(el("div", { class: s.pool ? "arch-pool pooled" : "arch-pool", text: into }));
      parts.push(el("div", { class: "arch-stage", dataset: { stage: s.index } },
        el("div", { class: "stage-title", text: `stage ${s.index}` }),
        el("div", { class: "stage-dims", text: `dim ${s.dim} · ${s.heads} heads · MLP ×${s.mlp_ratio} · ${s.attention} attention` }),
        el("div", { class: "stage-red", text: s.reduction.text }),
        el("div", { class: "cells" }, s.cells.map((c, j) => cell(c, j, most)))));
    }
    parts.push(el("div", { class: "arch-block head" }, el("b", { text: "head" }),
      el("span", { text: `${a.num_classes} classes` })));
    return el("div", { class: "arch", id: "arch" }, parts, legend());
  }

  function cell(c, j, most) {
    const bar = el("span", { class: "cell-bar" });
    bar.style.height = `${Math.max(4, Math.round(48 * c.tokens / most))}px`;
    return el("div", { class: `cell cell-${c.kind}${c.reduces ? " reduces" : ""}`,
      title: `cell ${j}: ${c.kind}, ${c.tokens} tokens after it${c.reduces ? " (reduces tokens)" : ""}`,
      dataset: { kind: c.kind, tokens: c.tokens } },
    el("span", { class: "cell-kind", text: c.kind }), bar,
    el("span", { class: "cell-tokens", text: c.reduces ? `▼${c.tokens}` : String(c.tokens) }));
  }

  function legend() {
    return el("div", { class: "legend" }, ["basic", "share", "identity"].map(k =>
      el("span", { class: `cell-${k} swatch`, text: k })), el("span", { text: "▼ token reduction · number: tokens after the cell" }));
  }

  return { el, plotlyText, fmt, getJSON, splitRef, campaignUrl, showError, ready, bestUnder, hover, openTrial };
})();
