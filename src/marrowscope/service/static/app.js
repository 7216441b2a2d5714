// marrowscope review: progress polling, keyboard/bulk re-classification, the field page's
// click-to-add. Plain JS, no build step.
(function () {
  "use strict";
  const body = document.body;

  const printButton = document.getElementById("print-button");
  if (printButton) printButton.addEventListener("click", () => window.print());

  // ------------------------------------------------------------------------------ a field page
  // A click on the field marks the point (field pixels) and fills the add-a-cell form; the form
  // itself posts (and works without this script, by typing x and y).
  const fieldSvg = document.getElementById("field-svg");
  if (fieldSvg) {
    if (body.dataset.fieldStatus === "pending") setTimeout(() => location.reload(), 1500);
    const addForm = document.getElementById("add-cell-form");
    const marker = document.getElementById("click-marker");
    if (addForm && fieldSvg.dataset.editable === "yes") {
      fieldSvg.addEventListener("click", (ev) => {
        const pt = fieldSvg.createSVGPoint();
        pt.x = ev.clientX; pt.y = ev.clientY;
        const p = pt.matrixTransform(fieldSvg.getScreenCTM().inverse());
        const box = fieldSvg.viewBox.baseVal;
        const x = Math.min(box.width - 1, Math.max(0, Math.round(p.x)));
        const y = Math.min(box.height - 1, Math.max(0, Math.round(p.y)));
        addForm.elements.x.value = x; addForm.elements.y.value = y;
        marker.setAttribute("cx", x); marker.setAttribute("cy", y);
        marker.classList.remove("hidden");
      });
    }
    const hash = location.hash.match(/^#cell-(\d+)$/);
    if (hash) {
      const rect = document.getElementById("box-" + hash[1]);
      if (rect) rect.classList.add("focused");
    }
  }

  const sampleId = body.dataset.sample;
  if (!sampleId) return;
  const csrf = body.dataset.csrf;
  const signed = body.dataset.signed === "yes";
  const keys = JSON.parse(body.dataset.keys || "{}");
  const api = "/api/samples/" + sampleId;

  async function call(method, url, payload) {
    const opts = { method, headers: { "X-CSRF-Token": csrf, Accept: "application/json" }, credentials: "same-origin" };
    if (payload instanceof FormData) opts.body = payload;
    else if (payload !== undefined) { opts.body = JSON.stringify(payload); opts.headers["Content-Type"] = "application/json"; }
    const res = await fetch(url, opts);
    let data = null;
    try { data = await res.json(); } catch (e) { data = null; }
    if (!res.ok) {
      const detail = data && data.detail ? (typeof data.detail === "string" ? data.detail : JSON.stringify(data.detail)) : res.statusText;
      throw new Error(detail);
    }
    return data;
  }

  function message(text, level) {
    const box = document.createElement("div");
    box.className = "msg " + (level || "info");
    box.setAttribute("role", level === "error" ? "alert" : "status");
    box.textContent = text;
    const main = document.querySelector("main");
    main.insertBefore(box, main.firstChild);
    setTimeout(() => box.remove(), level === "error" ? 12000 : 4000);
  }

  // ---------------------------------------------------------------- upload result after reload
  // Kept through the reload that follows classification, so the refused files stay listed.
  const uploadKey = "upload-result-" + sampleId;
  const stored = sessionStorage.getItem(uploadKey);
  if (stored) {
    sessionStorage.removeItem(uploadKey);
    showUpload(JSON.parse(stored));
  }
  function showUpload(result) {
    const box = document.getElementById("upload-result");
    if (!box) return;
    box.textContent = "";
    const p = document.createElement("p");
    const what = result.kind === "fields" ? " field(s) added (their cells are found and classified)" : " image(s) added";
    p.textContent = result.accepted.length + what + (result.rejected.length ? ", " + result.rejected.length + " refused:" : ".");
    box.appendChild(p);
    if (result.rejected.length) {
      const ul = document.createElement("ul");
      ul.className = "msg error";
      for (const r of result.rejected) { const li = document.createElement("li"); li.textContent = r.message; ul.appendChild(li); }
      box.appendChild(ul);
    }
  }
  const uploadForm = document.getElementById("upload-form");
  if (uploadForm) {
    uploadForm.addEventListener("submit", async (ev) => {
      ev.preventDefault();
      const data = new FormData();
      for (const f of uploadForm.querySelector("input[type=file]").files) data.append("files", f, f.name);
      const kind = (uploadForm.querySelector("input[name=kind]:checked") || {}).value || "cells";
      const button = uploadForm.querySelector("button");
      button.disabled = true; button.textContent = "Uploading…";
      try {
        const result = await call("POST", api + (kind === "fields" ? "/fields" : "/cells"), data);
        result.kind = kind;
        sessionStorage.setItem("upload-result-" + sampleId, JSON.stringify(result));
        location.reload();
      } catch (e) {
        message(e.message, "error");
        button.disabled = false; button.textContent = "Upload";
      }
    });
  }

  // ------------------------------------------------------------------------ progress polling
  const progress = document.getElementById("progress");
  async function poll() {
    try {
      const s = await call("GET", api);
      const p = s.summary.progress;
      progress.querySelector(".fill").style.width = (100 * p.classified / Math.max(1, p.total)) + "%";
      document.getElementById("progress-text").textContent = "Classifying: " + p.classified + " of " + p.total + " cells done" +
        (p.fields_pending ? " · " + p.fields_pending + " field(s) being searched for cells" : "");
      if (p.pending > 0 || p.fields_pending > 0) setTimeout(poll, 1000);
      else {
        if (stored) sessionStorage.setItem(uploadKey, stored);
        location.reload();
      }
    } catch (e) { setTimeout(poll, 3000); }
  }
  if (progress && Number(body.dataset.pending) > 0) setTimeout(poll, 800);

  // ------------------------------------------------------------------------------ the gallery
  const tiles = () => Array.from(document.querySelectorAll(".cell"));
  let focused = null;
  const selected = new Set();

  function setFocus(tile, open) {
    if (focused) focused.classList.remove("focused");
    focused = tile;
    if (!tile) return;
    tile.classList.add("focused");
    tile.focus({ preventScroll: false });
    if (open) openPanel(tile);
  }
  async function openPanel(tile) {
    const panel = document.getElementById("panel");
    try {
      const res = await fetch("/samples/" + sampleId + "/cells/" + tile.dataset.id + "/panel", { credentials: "same-origin" });
      const html = await res.text();
      if (tile !== focused) return; // another cell was opened meanwhile: its panel wins
      panel.innerHTML = html; // server-rendered, autoescaped fragment
      for (const b of panel.querySelectorAll("button.cls")) {
        b.addEventListener("click", () => { backToGallery(b); apply(b.dataset.label || null); });
      }
    } catch (e) { panel.textContent = "Cannot load the cell: " + e.message; }
  }
  // Keys act on the gallery (Enter confirms, a class key re-classifies, Space selects), but a
  // focused button or link keeps Enter and Space (they press it). So a gallery button (a class
  // in the panel, Select all, Confirm all) hands the focus back to the open cell when clicked,
  // and Enter goes on working after it: Select all, then Enter confirms the selection; a class
  // clicked for a selection, then Enter confirms the open cell.
  function backToGallery(button) {
    if (document.activeElement !== button) return; // clicked without taking the focus
    if (focused && focused.isConnected) focused.focus({ preventScroll: true });
    else button.blur();
  }
  function toggle(tile, on) {
    const id = tile.dataset.id;
    const want = on === undefined ? !selected.has(id) : on;
    if (want && tile.classList.contains("rejected")) {
      // not in the count: it cannot be classified (alone or with others) until it is restored
      message("cell " + id + " is rejected (not counted): restore it (in its panel) to classify it", "error");
      return;
    }
    if (want) selected.add(id); else selected.delete(id);
    tile.classList.toggle("selected", want);
    const box = tile.querySelector("input[type=checkbox]");
    if (box) box.checked = want;
    const info = document.getElementById("selection-info");
    if (info && selected.size) info.textContent = selected.size + " selected: press a class key, Enter to confirm, Esc to clear";
  }
  function clearSelection() { for (const t of tiles()) if (selected.has(t.dataset.id)) toggle(t, false); }

  function groupOf(label) {
    return document.querySelector('.group[data-group="' + CSS.escape(label || "unidentified") + '"]');
  }
  function refreshCounts() {
    for (const g of document.querySelectorAll(".group")) {
      const n = g.querySelectorAll(".cell").length;
      g.classList.toggle("empty", n === 0);
      const c = g.querySelector(".count"); if (c) c.textContent = "(" + n + ")";
    }
  }
  function updateSummary(s) {
    for (const r of s.differential) {
      const row = document.querySelector('#diff tr[data-class="' + CSS.escape(r.class) + '"]');
      if (!row) continue;
      row.querySelector(".mc").textContent = r.model_count;
      row.querySelector(".mp").textContent = r.model_percent.toFixed(1) + "%";
      row.querySelector(".rc").textContent = r.reviewed_count;
      row.querySelector(".rp").textContent = r.reviewed_percent.toFixed(1) + "%";
    }
    document.getElementById("tot-model").textContent = s.totals.model;
    document.getElementById("tot-reviewed").textContent = s.totals.reviewed;
    document.getElementById("flag-status").textContent = s.flag.status;
    document.getElementById("flag-message").textContent = s.flag.message;
    const basis = document.getElementById("flag-basis");
    if (basis) basis.textContent = s.flag.basis;
    const flag = document.getElementById("flag");
    flag.className = "card flag " + s.flag.status.replace(/ /g, "-");
    const blocking = document.getElementById("blocking");
    if (blocking) {
      // the server's own words: cells and fields that block, fields left out of the count
      blocking.className = !s.can_sign || s.progress.fields_failed ? "msg warn" : "muted";
      blocking.textContent = s.signoff_message;
    }
  }

  async function apply(label) {
    if (signed) return;
    let chosen = tiles().filter((t) => selected.has(t.dataset.id));
    const single = chosen.length === 0;
    if (single && focused) chosen = [focused];
    if (!chosen.length) { message("select a cell first", "error"); return; }
    try {
      const res = await call("POST", api + "/cells/reclassify", { cell_ids: chosen.map((t) => Number(t.dataset.id)), label: label });
      for (const t of chosen) {
        const newLabel = label || t.dataset.label || t.dataset.pred;
        t.dataset.label = newLabel;
        t.classList.add("reviewed");
        t.querySelector(".rev").textContent = " → " + newLabel;
        const target = groupOf(newLabel);
        if (target && target !== t.closest(".group")) target.querySelector(".cells").appendChild(t);
      }
      refreshCounts();
      updateSummary(res.summary);
      if (single) {
        const all = tiles(); const i = all.indexOf(focused);
        const open = (t) => !t.classList.contains("reviewed") && !t.classList.contains("rejected");
        const next = all.slice(i + 1).find(open) || all.find(open);
        setFocus(next || focused, true);
      } else {
        clearSelection();
      }
    } catch (e) { message(e.message, "error"); }
  }

  document.addEventListener("click", (ev) => {
    if (ev.target.closest("a")) return; // links (a cell's field) work as usual
    const tile = ev.target.closest(".cell");
    if (tile) {
      if (ev.target.matches("input[type=checkbox]")) {
        toggle(tile, ev.target.checked);
        backToGallery(ev.target); // a ticked box keeps no focus: class keys and Enter act next
        return;
      }
      ev.preventDefault();
      if (ev.ctrlKey || ev.metaKey || ev.shiftKey) toggle(tile);
      else setFocus(tile, true);
      return;
    }
    const group = ev.target.closest(".group");
    if (group && ev.target.matches(".select-group")) {
      backToGallery(ev.target);
      for (const t of group.querySelectorAll(".cell")) toggle(t, true);
    } else if (group && ev.target.matches(".confirm-group")) {
      backToGallery(ev.target);
      clearSelection();
      for (const t of group.querySelectorAll(".cell:not(.reviewed)")) toggle(t, true);
      if (selected.size) apply(null);
    }
  });

  document.addEventListener("keydown", (ev) => {
    if (ev.target.closest("input, textarea, select") || ev.ctrlKey || ev.metaKey || ev.altKey) return;
    // a focused button, link or <summary> keeps Enter and Space: they press it (Not a countable
    // cell, Restore, a class, Sign off...) or follow it; see backToGallery
    if ((ev.key === "Enter" || ev.key === " ") && ev.target.closest("button, a, summary")) return;
    const all = tiles();
    if (!all.length) return;
    const i = focused ? all.indexOf(focused) : -1;
    if (ev.key === "ArrowRight" || ev.key === "ArrowDown") { ev.preventDefault(); setFocus(all[Math.min(all.length - 1, i + 1)], true); }
    else if (ev.key === "ArrowLeft" || ev.key === "ArrowUp") { ev.preventDefault(); setFocus(all[Math.max(0, i - 1)], true); }
    else if (ev.key === " " && focused) { ev.preventDefault(); toggle(focused); }
    else if (ev.key === "Escape") { clearSelection(); }
    else if (ev.key === "Enter" && (focused || selected.size)) { ev.preventDefault(); apply(null); }
    else if (Object.prototype.hasOwnProperty.call(keys, ev.key.toLowerCase()) && (focused || selected.size)) { ev.preventDefault(); apply(keys[ev.key.toLowerCase()]); }
  });
})();
