// winnow run view: row-group map, gallery, score histograms (and, for a run with a corpus, the
// corpus it builds) of one image_curation DAG run.
// Plain JS, no dependencies; the page's CSP allows scripts from this origin only.
"use strict";

(function () {
  const params = new URLSearchParams(window.location.search);
  const dagId = params.get("dag_id") || "image_curation";
  const runId = params.get("run_id") || "";
  // A task-instance tab of an unmapped task gets "-1" or the bare placeholder: no partition then.
  const mapIndex = /^\d+$/.test(params.get("map_index") || "") ? Number(params.get("map_index")) : null;
  const api = "../api/runs/" + encodeURIComponent(runId);
  const POLL_MS = 3000;
  const COLORS = { c: "#2e7d32", f: "#c62828", ".": "#d9d9d9", run: "#64b5f6", bg: "#ffffff", mark: "#111111" };
  const $ = (id) => document.getElementById(id);

  const state = { progress: null, etag: null, timer: null, finished: false, maps: {}, scores: null,
                  galleryNext: 0, galleryLoaded: false, scoresLoaded: false, firstPaint: null,
                  filters: [], outcomes: [], corpus: null, corpusChecked: 0 };

  function text(el, value) { el.textContent = value; return el; }
  function el(tag, cls, content) {
    const e = document.createElement(tag);
    if (cls) e.className = cls;
    if (content !== undefined) e.textContent = content;
    return e;
  }
  function message(msg) { const m = $("message"); m.hidden = !msg; text(m, msg || ""); }
  function fmt(n) { return n === null || n === undefined ? "–" : Number(n).toLocaleString("en-US"); }

  // ---- tabs -----------------------------------------------------------------------------
  for (const b of document.querySelectorAll("#tabs button")) {
    b.addEventListener("click", () => showTab(b.dataset.tab));
  }
  function showTab(name) {
    for (const b of document.querySelectorAll("#tabs button")) b.classList.toggle("active", b.dataset.tab === name);
    for (const t of ["map", "gallery", "scores", "corpus", "card"]) $("tab-" + t).hidden = t !== name;
    if (name === "gallery" && !state.galleryLoaded) { state.galleryLoaded = true; loadGallery(true); }
    if (name === "scores" && !state.scoresLoaded) { state.scoresLoaded = true; loadScores(); }
    if (name === "corpus") loadCorpus();
    if (name === "card") loadCard();
    if (name === "map") drawMap();
  }

  // ---- progress polling (ETag; stops when the run ends; pauses while hidden) --------------
  async function poll() {
    state.timer = null;
    const headers = {};
    if (state.etag) headers["If-None-Match"] = state.etag;
    let r;
    try {
      r = await fetch(api + "/progress", { headers, credentials: "same-origin", cache: "no-store" });
    } catch (e) {
      text($("status"), "connection lost, retrying");
      return schedule();
    }
    if (r.status === 304) return schedule();
    if (r.status === 401 || r.status === 403) {
      message(r.status === 401 ? "Not signed in to Airflow." : "You may not read the image_curation DAG.");
      text($("status"), "no access");
      return;
    }
    const body = await r.json().catch(() => ({}));
    if (!r.ok) {
      message(body.detail || ("HTTP " + r.status));
      text($("status"), "waiting");
      return schedule();
    }
    state.etag = r.headers.get("ETag");
    state.progress = body;
    state.maps = {};
    for (const s of body.stages || []) state.maps[s.stage] = decodeRuns(s.map, byUnits(s) ? s.units : body.row_groups);
    message(body.waiting || "");
    render();
    refillGallery(body);
    const runState = body.dag_run && body.dag_run.state;
    state.finished = runState === "success" || runState === "failed";
    checkCorpus();
    if (!state.finished) schedule();
  }
  function schedule() {
    if (state.finished || state.timer || document.hidden) return;
    state.timer = setTimeout(poll, POLL_MS);
  }
  document.addEventListener("visibilitychange", () => {
    if (document.hidden) { if (state.timer) { clearTimeout(state.timer); state.timer = null; } }
    else if (!state.finished) poll();
  });

  function decodeRuns(rle, n) {
    const out = new Uint8Array(n || 0);
    const re = /(\d+)([cf.])/g;
    let m, i = 0;
    while ((m = re.exec(rle || "")) !== null) {
      const code = m[2] === "c" ? 1 : m[2] === "f" ? 2 : 0;
      out.fill(code, i, i + Number(m[1]));
      i += Number(m[1]);
    }
    return out;
  }

  // ---- run view ---------------------------------------------------------------------------
  // Stages that commit units of their own (centroids: one output; pairwise: buckets), not row groups.
  function byUnits(s) { return s.unit && s.unit !== "row group"; }
  function unitCount(s) {
    if (!byUnits(s)) return fmt(s.committed);
    const plural = s.units === 1 ? "" : "s";
    return s.units === null || s.units === undefined ? fmt(s.committed) + " " + s.unit + "s (of ?)"
      : fmt(s.committed) + " of " + fmt(s.units) + " " + s.unit + plural;
  }
  function partitionRange(p, g, parts) { return [Math.floor(p * g / parts), Math.floor((p + 1) * g / parts)]; }
  function partitionOf(rg, g, parts) {
    let q = Math.floor(rg * parts / g);
    while (q + 1 < parts && Math.floor((q + 1) * g / parts) <= rg) q++;
    while (q > 0 && Math.floor(q * g / parts) > rg) q--;
    return q;
  }

  function render() {
    const p = state.progress;
    const run = p.dag_run || {};
    let title = "winnow · " + (run.run_id || runId);
    if (mapIndex !== null && p.partitions) {
      const [a, b] = partitionRange(mapIndex, p.row_groups, p.partitions);
      title += " · p" + mapIndex + ": row groups " + a + "-" + (b - 1);
    }
    text($("title"), title);
    text($("status"), (run.state || "?") + " · " + fmt(p.records) + " records · " + fmt(p.row_groups) +
      " row groups · " + fmt(p.partitions) + " partitions · " + p.run_root);
    const body = $("stages").tBodies[0];
    body.replaceChildren();
    for (const s of p.stages) {
      const tr = el("tr");
      const status = s.status || "";
      tr.dataset.stage = s.stage; tr.dataset.status = status;
      tr.append(el("td", "", s.stage), el("td", "status " + status.replace(" ", "-"), status),
        el("td", "num", unitCount(s)), el("td", s.failed ? "num bad" : "num", fmt(s.failed)),
        el("td", "num", fmt(s.pending)), el("td", "num", s.records_per_s === null || s.records_per_s === undefined ? "–" : fmt(Math.round(s.records_per_s))));
      const bar = el("td", "bar-col"), outer = el("div", "bar"), done = el("div", "done"), bad = el("div", "failed");
      const total = byUnits(s) ? (s.units || 0) : p.row_groups;
      done.style.width = (status === "done" ? 100 : 100 * s.committed / Math.max(1, total)) + "%";
      bad.style.width = (status === "failed" && byUnits(s) ? 100 - 100 * s.committed / Math.max(1, total) : 100 * s.failed / Math.max(1, total)) + "%";
      outer.append(done, bad); bar.append(outer); tr.append(bar);
      body.append(tr);
    }
    renderSummary(p.summary);
    drawMap();
  }

  function renderSummary(summary) {
    const t = $("summary");
    $("summary-title").hidden = t.hidden = !summary;
    if (!summary) return;
    // Every outcome's count as the server lists them (kept first), then the run's other numbers.
    const counts = state.outcomes.map((o) => o.count);
    const keys = ["records", "kept", ...counts.filter((k) => k !== "kept"), "written",
      "members_without_image", "row_groups", "partitions", "row_groups_computed", "row_groups_skipped", "output"];
    const body = t.tBodies[0];
    body.replaceChildren();
    for (const k of keys) {
      if (!(k in summary)) continue;
      const tr = el("tr");
      tr.append(el("th", "", k), el("td", typeof summary[k] === "number" ? "num" : "", typeof summary[k] === "number" ? fmt(summary[k]) : String(summary[k])));
      body.append(tr);
    }
  }

  const ROW_H = 24, LABEL_W = 90, TOP = 18;
  function geometry() {
    const p = state.progress;
    const canvas = $("map");
    const width = Math.max(300, Math.floor($("map-wrap").clientWidth || 1000));
    const plotW = width - LABEL_W - 4;
    const g = p.row_groups;
    // One cell per row group while they fit; otherwise each pixel column aggregates a range.
    const perPx = g > plotW ? Math.ceil(g / plotW) : 0;
    const cellW = perPx ? 1 : Math.max(1, Math.floor(plotW / Math.max(1, g)));
    const columns = perPx ? Math.ceil(g / perPx) : g;
    return { canvas, width, plotW, g, perPx, cellW, columns, height: TOP + ROW_H * p.stages.length + 4 };
  }

  function runningRows(stage) {
    // Pending row groups of partitions whose task instance is running now.
    const p = state.progress;
    const tis = (p.tasks || {})[stage] || {};
    const rows = [];
    for (const [mi, st] of Object.entries(tis)) {
      if (st === "running" || st === "queued" || st === "up_for_retry" || st === "scheduled") rows.push(partitionRange(Number(mi), p.row_groups, p.partitions));
      if (Number(mi) === -1 && st === "running") rows.push([0, p.row_groups]);
    }
    return rows;
  }

  function drawMap() {
    const p = state.progress;
    if (!p || $("tab-map").hidden) return;
    const geo = geometry();
    const c = geo.canvas;
    const dpr = window.devicePixelRatio || 1;
    c.width = geo.width * dpr; c.height = geo.height * dpr;
    c.style.width = geo.width + "px"; c.style.height = geo.height + "px";
    const ctx = c.getContext("2d");
    ctx.setTransform(dpr, 0, 0, dpr, 0, 0);
    ctx.fillStyle = COLORS.bg; ctx.fillRect(0, 0, geo.width, geo.height);
    ctx.font = "12px system-ui, sans-serif";
    ctx.textBaseline = "middle";
    text($("map-scale"), geo.perPx ? "1 pixel column = " + fmt(geo.perPx) + " row groups" : "1 cell = 1 row group");
    // partition ticks
    if (p.partitions <= 256) {
      ctx.fillStyle = "#888";
      for (let q = 0; q <= p.partitions; q++) {
        const x = LABEL_W + xOf(Math.floor(q * p.row_groups / Math.max(1, p.partitions)), geo);
        ctx.fillRect(x, TOP - 6, 1, 5);
      }
    }
    if (mapIndex !== null && p.partitions) {
      const [a, b] = partitionRange(mapIndex, p.row_groups, p.partitions);
      ctx.fillStyle = "#fff3c4";
      ctx.fillRect(LABEL_W + xOf(a, geo), TOP - 2, Math.max(2, xOf(b, geo) - xOf(a, geo)), ROW_H * p.stages.length + 2);
    }
    p.stages.forEach((s, row) => {
      const y = TOP + row * ROW_H;
      ctx.fillStyle = "#222"; ctx.fillText(s.stage, 4, y + ROW_H / 2);
      if (byUnits(s)) { drawUnits(ctx, s, y, geo); return; }
      const states = state.maps[s.stage];
      const running = runningRows(s.stage);
      for (let col = 0; col < geo.columns; col++) {
        const lo = geo.perPx ? col * geo.perPx : col, hi = geo.perPx ? Math.min(geo.g, lo + geo.perPx) : col + 1;
        let done = 0, failed = 0;
        for (let i = lo; i < hi; i++) { if (states[i] === 1) done++; else if (states[i] === 2) failed++; }
        let color;
        if (failed) color = COLORS.f;
        else if (done === hi - lo) color = COLORS.c;
        else if (running.some(([a, b]) => lo < b && hi > a)) color = COLORS.run;
        else if (done) color = mix(COLORS["."], COLORS.c, done / (hi - lo));
        else color = COLORS["."];
        ctx.fillStyle = color;
        const x = LABEL_W + (geo.perPx ? col : col * geo.cellW);
        const w = geo.perPx ? 1 : Math.max(1, geo.cellW - (geo.cellW > 3 ? 1 : 0));
        ctx.fillRect(x, y + 3, w, ROW_H - 6);
      }
    });
    if (state.firstPaint === null) {
      state.firstPaint = performance.now();
      document.body.dataset.firstPaintMs = String(Math.round(state.firstPaint));
    }
    document.body.dataset.mapDrawn = "1";
  }
  // A stage's own units spread over the row's width: committed, else the colour of its status.
  function drawUnits(ctx, s, y, geo) {
    const states = state.maps[s.stage], n = states.length;
    const other = s.status === "failed" ? COLORS.f : s.status === "running" ? COLORS.run : COLORS["."];
    const w = geo.plotW / Math.max(1, n);
    for (let u = 0; u < Math.max(1, n); u++) {
      ctx.fillStyle = s.status === "done" || states[u] === 1 ? COLORS.c : other;
      ctx.fillRect(LABEL_W + u * w, y + 3, Math.max(1, w - (w > 3 ? 1 : 0)), ROW_H - 6);
    }
  }
  function xOf(rg, geo) { return geo.perPx ? Math.floor(rg / geo.perPx) : rg * geo.cellW; }
  function mix(a, b, t) {
    const pa = [1, 3, 5].map((i) => parseInt(a.substr(i, 2), 16)), pb = [1, 3, 5].map((i) => parseInt(b.substr(i, 2), 16));
    return "rgb(" + pa.map((v, i) => Math.round(v + (pb[i] - v) * t)).join(",") + ")";
  }

  $("map").addEventListener("mousemove", (ev) => {
    const p = state.progress, tip = $("tooltip");
    if (!p) return;
    const geo = geometry();
    const rect = $("map").getBoundingClientRect();
    const x = ev.clientX - rect.left - LABEL_W, y = ev.clientY - rect.top - TOP;
    const row = Math.floor(y / ROW_H);
    if (x < 0 || row < 0 || row >= p.stages.length) { tip.hidden = true; return; }
    const col = geo.perPx ? Math.floor(x) : Math.floor(x / geo.cellW);
    const lo = geo.perPx ? col * geo.perPx : col, hi = Math.min(geo.g, geo.perPx ? lo + geo.perPx : col + 1);
    if (lo >= geo.g) { tip.hidden = true; return; }
    const s = p.stages[row], states = state.maps[s.stage];
    if (byUnits(s)) {
      const u = Math.floor(x * Math.max(1, states.length) / geo.plotW);
      const what = states.length > 1 ? s.unit + " " + u + " · " + (states[u] === 1 ? "committed" : "not committed") : "";
      tip.replaceChildren(...[s.stage + " · " + s.status, unitCount(s) + " committed", what].filter(Boolean).map((l) => el("div", "", l)));
      tip.hidden = false;
      tip.style.left = Math.min(ev.clientX - rect.left + 12, rect.width - 320) + "px";
      tip.style.top = (ev.clientY - rect.top + 14) + "px";
      return;
    }
    let done = 0, failed = 0;
    for (let i = lo; i < hi; i++) { if (states[i] === 1) done++; else if (states[i] === 2) failed++; }
    const part = partitionOf(lo, p.row_groups, p.partitions);
    const lines = [s.stage + " · row group" + (hi - lo > 1 ? "s " + lo + "-" + (hi - 1) : " " + lo) + " · partition p" + part,
      done + " committed, " + failed + " failed, " + (hi - lo - done - failed) + " pending"];
    for (const e of s.errors.filter((e) => e.row_group >= lo && e.row_group < hi).slice(0, 3)) {
      lines.push("row group " + e.row_group + ": " + e.error);
    }
    if (failed && !s.errors.some((e) => e.row_group >= lo && e.row_group < hi)) lines.push("(error text not sent: more than " + s.errors.length + " failures in this stage)");
    tip.replaceChildren(...lines.map((l) => el("div", "", l)));
    tip.hidden = false;
    tip.style.left = Math.min(ev.clientX - rect.left + 12, rect.width - 320) + "px";
    tip.style.top = (ev.clientY - rect.top + 14) + "px";
  });
  $("map").addEventListener("mouseleave", () => { $("tooltip").hidden = true; });
  window.addEventListener("resize", () => drawMap());

  // ---- gallery ----------------------------------------------------------------------------
  function thumbUrl(rg, offset, size) { return api + "/thumbs/" + rg + "/" + offset + "/" + size; }

  async function loadGallery(reset) {
    const outcome = $("outcome").value;
    if (reset) { $("gallery").replaceChildren(); state.galleryNext = 0; }
    if (state.galleryNext === null) return;
    // A page that comes back after a newer load began (another outcome picked meanwhile) is dropped.
    const load = state.galleryLoad = (state.galleryLoad || 0) + 1;
    const q = new URLSearchParams({ cursor: String(state.galleryNext), limit: "24" });
    if (outcome) q.set("outcome", outcome);
    const r = await fetch(api + "/gallery?" + q, { credentials: "same-origin" });
    const body = await r.json().catch(() => ({}));
    if (load !== state.galleryLoad) return;
    if (!r.ok) { text($("gallery-count"), body.detail || ("HTTP " + r.status)); return; }
    for (const item of body.items) $("gallery").append(card(item));
    state.galleryNext = body.next;
    state.galleryWritten = body.written;
    $("more").hidden = body.next === null;
    const shown = $("gallery").children.length + " shown";
    text($("gallery-count"), body.waiting ? shown + " · " + body.waiting : shown + (body.next === null ? " (all)" : ""));
  }
  // While write is committing, a gallery that reached the end reloads when more row groups are written.
  function refillGallery(body) {
    if (!state.galleryLoaded || $("tab-gallery").hidden || state.galleryNext !== null) return;
    const write = (body.stages || []).find((s) => s.stage === "write");
    if (write && state.galleryWritten !== undefined && write.committed > state.galleryWritten) loadGallery(true);
  }
  function thumb(rg, offset, size, alt, missing) {
    if (offset === null || offset === undefined) return el("div", "nothumb", missing || "no thumbnail");
    const img = el("img");
    img.loading = "lazy"; img.alt = alt; img.src = thumbUrl(rg, offset, size);
    return img;
  }
  function card(item) {
    const c = el("figure", "card " + item.outcome);
    const pics = el("div", "pics");
    const takenDown = item.outcome === "takedown";
    const inCorpus = item.outcome === "corpus_duplicate";
    // A taken-down record's picture is never made: the card says so.
    pics.append(thumb(item.row_group, item.thumb_offset, item.thumb_size, item.key, takenDown ? "taken down: not shown" : null));
    // A near duplicate beside its kept twin (an exact duplicate's twin is the same image); a
    // corpus duplicate beside the earlier corpus record's picture (none once that was taken down).
    if (item.outcome === "duplicate") pics.append(thumb(item.row_group, item.original_thumb_offset, item.original_thumb_size, "original " + (item.duplicate_of_key || "")));
    if (inCorpus) pics.append(thumb(item.row_group, item.original_thumb_offset, item.original_thumb_size,
      "corpus record " + (item.duplicate_of_key || ""), "earlier picture not available (taken down since?)"));
    c.append(pics);
    const cap = el("figcaption");
    cap.append(el("div", "key", item.key), el("div", "reason", item.reason));
    if (inCorpus && (item.duplicate_of_run || item.duplicate_of_key)) {
      cap.append(el("div", "twin", "earlier: run " + (item.duplicate_of_run || "?") + " · key " + (item.duplicate_of_key || "?")));
    }
    if (takenDown && item.takedown_reason) {
      cap.append(el("div", "takedown-reason", "takedown: " + item.takedown_reason + (item.takedown_date ? " (" + item.takedown_date + ")" : "")));
    }
    const scores = [];
    const seen = new Set();
    for (const f of state.filters) {
      for (const c of f.columns) {
        if (seen.has(c)) continue;
        seen.add(c);
        const v = item[c];
        if (v !== null && v !== undefined) scores.push(c + " " + (Number.isInteger(v) ? String(v) : v.toFixed(3)));
      }
    }
    cap.append(el("div", "muted", scores.join(" · ") + " · row group " + item.row_group));
    c.append(cap);
    return c;
  }
  $("outcome").addEventListener("change", () => loadGallery(true));
  $("more").addEventListener("click", () => loadGallery(false));

  // ---- score histograms, what-if thresholds and keep fractions ---------------------------
  // One figure per filter the server lists: its histogram, a what-if threshold slider (and an
  // on/off box where the filter can be off), and a keep-fraction slider where it has one.
  function known(v) { return v !== null && v !== undefined; }
  function num(v, digits) { return known(v) ? Number(v).toFixed(digits) : "–"; }
  const SIDE = { ">=": "≥", "<": "<", "<=": "≤" };
  const KEPT_SIDE = { ">=": "kept: at least the threshold", "<": "kept: below the threshold", "<=": "kept: at most the threshold" };
  // b: the record's bin; -1: no value (fails while the filter is on); -2: a value no one knows
  // that the filter lets pass (an unreadable image header).
  function passesBin(f, b, t) {
    if (b < 0) return b === -2;
    return f.keep === ">=" ? f.edges[b] >= t - 1e-12 : f.edges[b + 1] <= t + 1e-12;
  }
  async function loadScores() {
    const r = await fetch(api + "/scores", { credentials: "same-origin" });
    const body = await r.json().catch(() => ({}));
    if (!r.ok) { text($("scores-note"), body.detail || ("HTTP " + r.status)); return; }
    state.scores = body;
    const s = body;
    const off = s.filters.filter((f) => f.enabled === false).map((f) => f.label);
    const unknown = s.filters.some((f) => f.enabled === null);
    text($("scores-note"), fmt(s.population) + " records in " + fmt(s.row_groups) + " row groups are neither exact duplicates, " +
      "undecodable nor near duplicates: the histograms show those that have each value" +
      (s.sampled ? " (estimated from an even sample of the run's " + fmt(s.row_groups_total) + " row groups)" : "") +
      "; " + fmt(s.exact_duplicates) + " exact duplicates, " + fmt(s.undecodable) + " undecodable and " + fmt(s.duplicates) +
      " near duplicates are not shown. Duplicate flags are as the run's dedup found them; records a filter dropped before " +
      "decoding have no scores. " + (unknown ? "The run has not reached its thresholds step: its thresholds are not known yet."
        : off.length ? "Filters off in this run: " + off.join(", ") + "." : "Every filter is on in this run."));
    const hists = $("hists");
    hists.replaceChildren();
    for (const f of s.filters) hists.append(filterFigure(f));
    const sampleNote = s.sampled ? " Estimated from a sample of row groups: counts are of the records read (≈ × " + num(s.scale, 1) + " for the whole run)." : "";
    text($("fractions-note"), "A keep fraction f keeps the round(f × n) best of the n records that have the value (the lowest, for a filter " +
      "that keeps low values), over the whole run: " +
      "the threshold is the value of the last of them, and every record on its side is kept (ties included), " +
      "before the other filters and dedup." + sampleNote);
    drawScores();
  }
  function filterFigure(f) {
    const fig = el("figure");
    fig.dataset.filter = f.name;
    const cap = el("figcaption", "", f.label + " (" + (f.enabled === false ? "filter off in this run" : KEPT_SIDE[f.keep]) + ")");
    const canvas = el("canvas");
    canvas.id = "hist-" + f.name; canvas.width = 560; canvas.height = 240;
    fig.append(cap, canvas);
    const box = el("div", "whatif");
    const label = el("label", "", "what-if " + f.threshold_param + " ");
    const input = el("input");
    input.type = "range"; input.id = "t-" + f.name;
    input.min = "0"; input.max = String(f.edges.length - 1); input.step = "1";
    // Start at the run's threshold; without one, where the filter keeps everything.
    let best = f.keep === ">=" ? 0 : f.edges.length - 1;
    if (known(f.threshold) && f.enabled !== false) f.edges.forEach((e, i) => { if (Math.abs(e - f.threshold) < Math.abs(f.edges[best] - f.threshold)) best = i; });
    input.value = String(best);
    input.addEventListener("input", drawScores);
    const out = el("output"); out.id = "t-" + f.name + "-value";
    label.append(input, out);
    box.append(label);
    if (known(f.off)) {
      const on = el("label", "", " on ");
      const check = el("input");
      check.type = "checkbox"; check.id = "on-" + f.name; check.checked = f.enabled === true;
      check.addEventListener("change", drawScores);
      on.append(check);
      box.append(on);
    }
    if (f.fraction_param) {
      const fl = el("label", "", f.fraction_param + " ");
      const fr = el("input");
      fr.type = "range"; fr.id = "f-" + f.name; fr.min = "1"; fr.max = "100"; fr.step = "1";
      let start = 50;
      const q = f.fraction_table;
      if (q && q.length) {
        if (known(f.run_fraction)) start = Math.round(f.run_fraction * 100);
        else if (known(f.threshold)) {
          // Thresholds fall as the fraction grows for a filter keeping high values, rise for one keeping low ones.
          const i = q.findIndex((row) => f.keep === ">=" ? row.threshold <= f.threshold : row.threshold >= f.threshold);
          start = i < 0 ? 100 : i + 1;
        }
      }
      fr.value = String(Math.min(100, Math.max(1, start)));
      fr.addEventListener("input", drawScores);
      const fo = el("output"); fo.id = "f-" + f.name + "-value";
      fl.append(fr, fo);
      const ft = el("p"); ft.id = "f-" + f.name + "-text";
      box.append(fl, ft);
    }
    fig.append(box);
    return fig;
  }
  // A threshold in the param's own terms: an integer param keeps values of at least the next integer.
  function shown(f, t) { return f.integer ? String(Math.ceil(Number(t) - 1e-9)) : Number(t).toFixed(3); }
  function whatIf(f) {
    const check = $("on-" + f.name);
    const on = check ? check.checked : true;
    const t = f.edges[Number($("t-" + f.name).value)];
    return { on, t };
  }
  function fractionText(f, row) {
    const s = state.scores;
    const id = "f-" + f.name;
    text($(id + "-value"), (Number($(id).value) / 100).toFixed(2));
    if (!row) { text($(id + "-text"), "No record has a " + f.label + " yet."); return; }
    const est = s.sampled ? " (≈ " + fmt(Math.round(row.keeps * s.scale)) + " in the whole run)" : "";
    let run = "";
    if (f.enabled === false) run = " The filter is off in this run.";
    else if (known(f.run_fraction)) run = " The run used keep fraction " + num(f.run_fraction, 2) + ": threshold " + num(f.threshold, 4) + ".";
    else if (known(f.threshold)) run = " The run used an absolute threshold " + num(f.threshold, 4) + ".";
    text($(id + "-text"), "Keep fraction " + row.fraction.toFixed(2) + " picks " + f.label + " " + SIDE[f.keep] + " " + row.threshold.toFixed(4) + ": it keeps " +
      fmt(row.keeps) + " of " + fmt(f.fraction_scored) + " records with a " + f.label + est + "." + run);
  }
  function drawScores() {
    const s = state.scores;
    if (!s) return;
    const wi = s.filters.map(whatIf);
    s.filters.forEach((f, k) => {
      const { on, t } = wi[k];
      text($("t-" + f.name + "-value"), on ? shown(f, t) : "off");
      const row = f.fraction_param && f.fraction_table && f.fraction_table.length ? f.fraction_table[Number($("f-" + f.name).value) - 1] : null;
      if (f.fraction_param) fractionText(f, row);
      drawHist($("hist-" + f.name), f.edges, f.counts, {
        whatIf: on ? t : null, run: f.enabled === false ? null : f.threshold, fraction: row && row.threshold,
        keptAbove: f.keep === ">=", isKept: (b) => !on || passesBin(f, b, t),
        note: f.scored ? null : "no record has this value",
      });
    });
    // The what-if: every cell (one bin per filter) that each filter turned on keeps.
    const n = s.filters.length;
    let kept = 0;
    for (const cell of s.whatif.cells) {
      let ok = true;
      for (let k = 0; k < n && ok; k++) if (wi[k].on) ok = passesBin(s.filters[k], cell[k], wi[k].t);
      if (ok) kept += cell[n];
    }
    kept = Math.round(kept * s.whatif.scale);
    const parts = s.filters.map((f, k) => wi[k].on ? f.threshold_param + " " + shown(f, wi[k].t) : f.name + " off");
    const share = s.population ? (100 * kept / s.population).toFixed(1) : "0";
    text($("whatif"), "With " + parts.join(", ") + ": " + fmt(kept) + " of " + fmt(s.population) + " kept (" + share + "%)" +
      (s.whatif.sampled ? ", estimated from " + fmt(s.whatif.records) + " records" : "") +
      "; the run's thresholds keep " + fmt(s.kept_at_thresholds) + ".");
    document.body.dataset.histDrawn = "1";
  }
  // opts: whatIf (red line), run (dashed: the run's threshold), fraction (blue: a keep fraction's
  // threshold), keptAbove (kept side is right of the threshold), isKept(bin), note (replaces the shares).
  function drawHist(canvas, edges, counts, opts) {
    const ctx = canvas.getContext("2d");
    const W = canvas.width, H = canvas.height, pad = 28;
    ctx.clearRect(0, 0, W, H);
    ctx.fillStyle = "#fff"; ctx.fillRect(0, 0, W, H);
    const max = Math.max(1, ...counts), n = counts.length, bw = (W - 2 * pad) / Math.max(1, n);
    const total = counts.reduce((x, y) => x + y, 0);
    let keptN = 0;
    counts.forEach((c, i) => {
      const h = (H - 2 * pad) * c / max;
      const k = opts.isKept(i);
      if (k) keptN += c;
      ctx.fillStyle = k ? COLORS.c : "#9e9e9e";
      ctx.fillRect(pad + i * bw, H - pad - h, Math.max(1, bw - 1), h);
    });
    const lo = edges[0], hi = edges[edges.length - 1];
    const xOfVal = (v) => pad + (W - 2 * pad) * (Math.min(hi, Math.max(lo, v)) - lo) / ((hi - lo) || 1);
    function line(v, color, width, dash) {
      if (!known(v)) return;
      ctx.strokeStyle = color; ctx.lineWidth = width; ctx.setLineDash(dash);
      ctx.beginPath(); ctx.moveTo(xOfVal(v), pad - 8); ctx.lineTo(xOfVal(v), H - pad); ctx.stroke();
      ctx.setLineDash([]); ctx.lineWidth = 1;
    }
    line(opts.run, "#555", 1, [4, 3]);
    line(opts.fraction, "#1565c0", 2, []);
    line(opts.whatIf, COLORS.f, 2, []);
    ctx.fillStyle = "#222"; ctx.font = "12px system-ui, sans-serif"; ctx.textBaseline = "alphabetic";
    ctx.fillText(lo.toFixed(2), pad, H - 8);
    const last = hi.toFixed(2);
    ctx.fillText(last, W - pad - ctx.measureText(last).width, H - 8);
    if (opts.note) { ctx.fillText(opts.note, pad, 12); return; }
    const pct = (v) => total ? (100 * v / total).toFixed(1) + "%" : "–";
    const leftLabel = opts.keptAbove ? "dropped " + pct(total - keptN) : "kept " + pct(keptN);
    const rightLabel = opts.keptAbove ? "kept " + pct(keptN) : "dropped " + pct(total - keptN);
    // Left of the threshold at the top left, right of it at the top right: never overlapping.
    ctx.fillText("← " + leftLabel, pad, 12);
    ctx.fillText(rightLabel + " →", W - pad - ctx.measureText(rightLabel + " →").width, 12);
  }

  // ---- the corpus the run builds (a run with a corpus_uri only) -----------------------------
  // The tab shows once the server says the run has a corpus; a running run that does not say so
  // yet is asked again at most every 15 s (its corpus steps may not have run), a finished one once more.
  async function checkCorpus() {
    if (state.corpus) return;
    const now = Date.now();
    if (state.corpusChecked && (now - state.corpusChecked < 15000 && !state.finished || state.corpusFinal)) return;
    state.corpusChecked = now;
    if (state.finished) state.corpusFinal = true;
    let r;
    try { r = await fetch(api + "/corpus", { credentials: "same-origin", cache: "no-store" }); } catch (e) { return; }
    if (!r.ok) return;
    state.corpus = await r.json().catch(() => null);
    if (state.corpus) document.querySelector("#tabs button[data-tab=corpus]").hidden = false;
  }
  async function loadCorpus() {
    let body;
    try {
      const r = await fetch(api + "/corpus", { credentials: "same-origin", cache: "no-store" });
      body = await r.json().catch(() => ({}));
      if (!r.ok) { text($("corpus-totals"), body.detail || ("HTTP " + r.status)); return; }
    } catch (e) { text($("corpus-totals"), "connection lost"); return; }
    state.corpus = body;
    renderCorpus(body);
  }
  function renderCorpus(c) {
    const runs = c.runs || [], takedowns = c.takedowns || [];
    text($("corpus-totals"), fmt(c.records) + " records in corpus " + c.corpus_uri + " (generation " + fmt(c.generation) + "): " +
      fmt(c.published_records) + " published by " + fmt(runs.length) + (runs.length === 1 ? " run" : " runs") + ", " +
      fmt(c.taken_down) + " taken down by " + fmt(takedowns.length) + (takedowns.length === 1 ? " takedown." : " takedowns."));
    const me = c.this_run || {};
    text($("corpus-this"), me.published
      ? "This run (" + me.run_key + ") published as generation " + fmt(me.generation) + (me.logical_date ? ", logical date " + me.logical_date : "") + "."
      : "This run (" + me.run_key + ") has not published to the corpus (yet): it publishes after its write stage, once every earlier date has published.");
    const body = $("corpus-runs").tBodies[0];
    body.replaceChildren();
    for (const r of runs) {
      const tr = el("tr", r.this ? "this" : "");
      const n = r.counts || {};
      tr.dataset.runKey = r.run_key;
      tr.append(el("td", "num", fmt(r.generation)), el("td", "key", r.run_key + (r.this ? " (this run)" : "")),
        el("td", "", r.logical_date || "–"), el("td", "num", fmt(n.records)), el("td", "num", fmt(n.kept)),
        el("td", "num", fmt(r.records)), el("td", "num", fmt(n.corpus_duplicates)), el("td", "num", fmt(n.takedowns)),
        el("td", "num", fmt(r.left_out)), el("td", "", r.published_at || "–"));
      body.append(tr);
    }
    const tbody = $("corpus-takedowns").tBodies[0];
    tbody.replaceChildren();
    $("takedowns-none").hidden = takedowns.length > 0;
    $("corpus-takedowns").hidden = takedowns.length === 0;
    for (const t of takedowns) {
      const tr = el("tr");
      tr.append(el("td", "num", fmt(t.generation)), el("td", "", t.date || "–"), el("td", "", t.reason || ""),
        el("td", "num", fmt(t.identifiers)), el("td", "num", fmt(t.removed)), el("td", "key", (t.run_keys || []).join(", ") || "–"),
        el("td", "num", fmt(t.files_rewritten)), el("td", "key", t.id || ""));
      tbody.append(tr);
    }
    document.body.dataset.corpusDrawn = "1";
  }

  // ---- the run's dataset card (card.json + CARD.md, written by the report task) ------------------
  // Built from the card's own data: the filters, outcomes and EU AI Act fields are the card's lists.
  async function loadCard() {
    let body;
    try {
      const r = await fetch(api + "/card", { credentials: "same-origin", cache: "no-store" });
      body = await r.json().catch(() => ({}));
      if (!r.ok) { text($("card-head"), body.detail || ("HTTP " + r.status)); return; }
    } catch (e) { text($("card-head"), "connection lost"); return; }
    renderCard(body.card || {}, body.markdown || "");
  }
  function show(v) {
    if (v === null || v === undefined || v === "") return "–";
    if (typeof v === "boolean") return v ? "yes" : "no";
    if (Array.isArray(v)) return v.map(show).join(", ");
    if (typeof v === "object") return Object.entries(v).map(([k, x]) => k + ": " + show(x)).join("; ");
    return String(v);
  }
  function cardTable(title, header, rows) {
    const box = $("card-sections");
    box.append(el("h2", "", title));
    const table = el("table", "dcard");
    if (header) {
      const tr = el("tr");
      for (const h of header) tr.append(el("th", "", h));
      const thead = el("thead");
      thead.append(tr);
      table.append(thead);
    }
    const tbody = el("tbody");
    for (const row of rows) {
      const tr = el("tr");
      row.forEach((cell, i) => tr.append(el(i === 0 && !header ? "th" : "td", typeof cell === "number" ? "num" : "", show(cell))));
      tbody.append(tr);
    }
    table.append(tbody);
    box.append(table);
  }
  function chosenText(f) {
    if (!f.recorded) return "not recorded by this run";
    if (!f.enabled) return "off (" + f.param + " = " + show(f.absolute) + ")";
    if (f.chosen_by === "keep_fraction") {
      return "chosen by keep_fraction: " + f.param + " = " + f.keep_fraction + " -> computed" +
        (f.scored !== undefined && f.scored !== null ? ", keeps " + f.keep_count + " of " + f.scored + " scored" : "");
    }
    return "fixed threshold (" + f.param + ")";
  }
  function renderCard(c, markdown) {
    const run = c.run || {}, src = c.sources || {}, models = c.models || {}, pre = c.preprocessing || {};
    const winnow = run.winnow || {};
    text($("card-head"), "Dataset card of run " + run.run_key + " (winnow " + show(winnow.version) + "), logical date " +
      show(run.logical_date) + ": built from the run's storage by its report task.");
    const warn = $("card-warning");
    warn.hidden = !models.random_weights;
    text(warn, models.random_weights ? "Random model weights (allow_random_weights): the scores and the filters' decisions mean nothing." : "");
    $("card-sections").replaceChildren();
    cardTable("Sources", null, [["input", src.input_uri], ["shards", src.shards],
      ["bytes", src.bytes !== null && src.bytes !== undefined ? src.bytes : src.bytes_note],
      ["listing digest", src.listing_digest], ["records indexed", src.records],
      ["members without image", src.members_without_image], ["bad shards", src.bad_shards]]);
    const emb = models.embedding || {};
    cardTable("Models and weights", ["stage", "model", "weights digest", "weights file"],
      [["embedding model", emb.model + " (pretrained " + show(emb.pretrained) + ", width " + show(emb.embed_dim) + ")", emb.weights_digest, emb.model_dir]]
        .concat((models.weights || []).map((w) => [w.stage === w.name ? w.stage : w.stage + " (" + w.name + ")", w.model || w.name, w.weights_digest, w.weights_file])));
    const image = pre.image || {};
    cardTable("Preprocessing", null, [["resize / crop", image.resize], ["size", image.size], ["interpolation", image.interpolation],
      ["mean / std", show(image.mean) + " / " + show(image.std)], ["precision", pre.precision], ["max pixels", pre.max_pixels],
      ["decoder", pre.decoder], ["filters applied before decode", pre.skipped_before_decode || "none"]]);
    cardTable("Filters", ["filter", "value", "keep", "threshold", "chosen", "dropped"], (c.filters || []).map((f) =>
      [f.name, f.label, f.keep, f.enabled ? f.threshold : "–", chosenText(f), f.enabled ? show(f.dropped) + " (" + f.count + ")" : "–"]));
    const d = c.dedup || {}, conf = d.configured || {}, used = d.used || {};
    cardTable("Dedup", null, [["method", d.method], ["eps", conf.dedup_eps],
      ["clusters", show(conf.dedup_clusters) + " configured (0 = automatic), " + show(used.k) + " used"],
      ["pairwise buckets", show(conf.dedup_buckets) + " configured, " + show(used.buckets) + " used"],
      ["near duplicates dropped", d.duplicates], ["exact duplicates dropped", d.exact_duplicates]]);
    const counts = c.counts || {};
    cardTable("Counts (" + show(counts.records) + " records)", ["outcome", "count", "records"],
      (counts.outcomes || []).map((o) => [o.outcome, o.count, o.records]).concat([["written", "written", counts.written]]));
    const td = c.takedowns || {};
    cardTable("Takedowns", ["generation", "date", "reason", "identifiers", "removed", "in force at the run's check"],
      td.applied ? (td.takedowns || []).map((t) => [t.generation, t.date, t.reason, t.identifiers, t.removed, t.in_force_at_check])
        : [["–", "–", td.note, "–", "–", "–"]]);
    if (td.applied) $("card-sections").append(el("p", "muted", show(td.records_dropped) + " records of this run dropped as listed by a takedown."));
    if (c.corpus && !c.corpus.error) {
      const cp = c.corpus;
      cardTable("Corpus " + cp.corpus_uri + " (generation " + show(cp.generation) + ", " + show(cp.records) + " records)",
        ["generation", "run key", "logical date", "records added", "published at"],
        (cp.runs || []).map((r) => [r.generation, r.run_key + (r.run_key === run.run_key ? " (this run)" : ""), r.logical_date, r.records, r.published_at]));
    }
    const eu = c.eu_ai_act || {};
    cardTable("EU AI Act: public summary of training content", ["section", "field", "value", "source"],
      (eu.fields || []).map((f) => [f.section, f.field, f.value !== null && f.value !== undefined ? f.value : f.status, f.source]));
    $("card-sections").append(el("p", "muted", show(eu.template) + ". " + show(eu.note)));
    text($("card-md"), markdown);
    $("card-md-wrap").hidden = !markdown;
    document.body.dataset.cardDrawn = "1";
  }

  // ---- the filters, as the engine declares them ----------------------------------------------
  async function loadFilters() {
    try {
      const r = await fetch("../api/filters", { credentials: "same-origin" });
      if (!r.ok) return;
      const body = await r.json();
      state.filters = body.filters || [];
      state.outcomes = body.outcomes || [];
    } catch (e) { return; }
    const select = $("outcome");
    const kept = state.outcomes.filter((o) => o.name === "kept");
    for (const o of [...kept, ...state.outcomes.filter((o) => o.name !== "kept")]) {
      const opt = el("option", "", o.name === "kept" ? o.label : "dropped: " + o.label);
      opt.value = o.name;
      select.append(opt);
    }
  }

  // ---- start ------------------------------------------------------------------------------
  if (dagId !== "image_curation") {
    message("This view shows image_curation runs only; this run belongs to " + dagId + ".");
    text($("status"), "");
  } else if (!runId) {
    message("No run_id in the address.");
  } else {
    loadFilters().then(poll);
  }
})();
