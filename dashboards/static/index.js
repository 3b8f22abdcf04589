// The campaign list: target, trials, front size, best accuracy under each budget; pick two or
// more to see them side by side.
"use strict";

(async () => {
  const { el, fmt, getJSON, campaignUrl } = VN;
  const query = new URLSearchParams(location.search);
  const budgetsInput = document.getElementById("budgets");
  budgetsInput.value = query.get("budgets") || "";

  let data;
  try {
    data = await getJSON(`/api/campaigns?budgets=${encodeURIComponent(budgetsInput.value)}`);
  } catch (error) {
    VN.showError(error);
    return;
  }
  document.getElementById("store").textContent = data.tracking_uri;

  const best = (pick) => pick === null
    ? el("td", { class: "num", text: "–" })
    : el("td", { class: "num", dataset: { runId: pick.run_id } }, fmt(pick.accuracy, 4),
      el("small", { text: ` #${pick.trial_number} · ${fmt(pick.latency_ms)} ms` }));

  const head = el("tr", {}, el("th", { text: "compare" }), el("th", { text: "campaign" }),
    el("th", { text: "experiment" }), el("th", { text: "target" }), el("th", { text: "space" }),
    el("th", { text: "status" }), el("th", { text: "trials" }), el("th", { text: "front" }),
    el("th", { text: "budget" }), el("th", { text: "best under its budget" }), el("th", { text: "best, any latency" }),
    data.budgets.map(b => el("th", { class: "budget-col", text: `best ≤ ${b} ms` })));
  const rows = data.campaigns.map(c => el("tr", { dataset: { ref: c.ref } },
    el("td", {}, el("input", { type: "checkbox", class: "pick", value: c.ref, "aria-label": `compare ${c.name}` })),
    el("td", {}, el("a", { class: "campaign-link", href: campaignUrl(c.ref), text: c.name })),
    el("td", { text: c.experiment }),
    el("td", { text: c.target }),
    el("td", { text: c.space }),
    el("td", { text: c.status }),
    el("td", { class: "num trials", text: c.trials },
      c.failed ? el("small", { text: ` (${c.failed} failed)` }) : null,
      c.running ? el("small", { text: ` (${c.running} running)` }) : null),
    el("td", { class: "num front", text: c.front }),
    el("td", { class: "num", text: c.budget_ms === null ? "–" : `${c.budget_ms} ms` }),
    best(c.best_own), best(c.best_any), c.best.map(best)));
  const table = document.getElementById("campaigns");
  table.replaceChildren(el("thead", {}, head), el("tbody", {}, rows));
  document.getElementById("empty").hidden = rows.length > 0;

  const button = document.getElementById("compare");
  const picked = () => [...document.querySelectorAll("input.pick:checked")].map(i => i.value);
  table.addEventListener("change", () => { button.disabled = picked().length < 2; });
  button.addEventListener("click", () => {
    const q = new URLSearchParams();
    picked().forEach(ref => q.append("c", ref));
    location.href = `/compare?${q}`;
  });
  document.getElementById("budgets-form").addEventListener("submit", (event) => {
    event.preventDefault();
    location.search = new URLSearchParams({ budgets: budgetsInput.value }).toString();
  });
  VN.ready();
})();
