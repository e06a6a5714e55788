// The Glaze grid page: the tables list (/) and one table as a spreadsheet (/tables/{id}).
//
// Everything comes from the same JSON API an app uses, with the session cookie (or an open
// server). A job's progress comes from its Server-Sent Events stream (seed 004), read with the
// job's public token; with no token, or a stream that keeps failing, the page polls the job.
// Data only ever reaches the DOM as text (textContent, attributes), never as HTML.
"use strict";

const ROWS_PER_PAGE = 100;
const POLL_MS = 1000;
const STREAM_ERRORS_BEFORE_POLLING = 3;
const ENDED = new Set(["completed", "failed", "cancelled"]);
// The header status only moves forward: a late poll answer never takes it back.
const RANK = { starting: 0, pending: 1, running: 2, completed: 3, failed: 3, cancelled: 3 };

const $ = (selector) => document.querySelector(selector);
const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

// --- the API ------------------------------------------------------------------------------

class ApiError extends Error {
  constructor(status, message) {
    super(message);
    this.status = status;
  }
}

/** Call the API with the session cookie; answers the parsed JSON, throws ApiError. */
async function api(method, path, body) {
  const init = { method, credentials: "same-origin", headers: { Accept: "application/json" } };
  if (body instanceof FormData) {
    init.body = body;
  } else if (body !== undefined) {
    init.headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(body);
  }
  const response = await fetch(path, init);
  const text = await response.text();
  let data = null;
  try {
    data = text ? JSON.parse(text) : null;
  } catch {
    data = { detail: text.slice(0, 200) };
  }
  if (response.status === 401) $("#signin").hidden = false;
  if (!response.ok) throw new ApiError(response.status, describeError(response, data));
  return data;
}

/** The API's `detail`: a sentence, or FastAPI's list of invalid fields. */
function describeError(response, data) {
  const detail = data && data.detail;
  if (typeof detail === "string") return detail;
  if (Array.isArray(detail)) {
    return detail.map((d) => `${(d.loc || []).join(".")}: ${d.msg}`).join("; ");
  }
  return `${response.status} ${response.statusText}`;
}

// --- small DOM helpers ----------------------------------------------------------------------

/** A new element: `attrs` become attributes (`class`, `data-*`, `title`, ...), children text. */
function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs)) {
    if (value !== undefined && value !== null && value !== false) node.setAttribute(name, value);
  }
  node.append(...children.filter((child) => child !== null && child !== undefined));
  return node;
}

function showError(error) {
  if (error instanceof ApiError && error.status === 401) return; // the sign-in banner says it
  const box = $("#error");
  box.textContent = error.message || String(error);
  box.hidden = false;
}

function clearError() {
  $("#error").hidden = true;
}

function displayValue(value) {
  if (value === null || value === undefined) return "";
  return typeof value === "object" ? JSON.stringify(value) : String(value);
}

function displayDate(iso) {
  return iso ? new Date(iso).toLocaleString() : "";
}

/** A job's time: the clock time today, the date before. */
function displayWhen(iso) {
  if (!iso) return "";
  const when = new Date(iso);
  const today = when.toDateString() === new Date().toDateString();
  return today ? when.toLocaleTimeString([], { hour12: false }) : when.toLocaleDateString();
}

function displayCost(cost) {
  return Number(cost || 0).toLocaleString(undefined, { maximumFractionDigits: 2 });
}

function tableHref(tableId) {
  return `/tables/${encodeURIComponent(tableId)}`;
}

function tablePath(suffix = "") {
  return `${tableHref(grid.tableId)}${suffix}`;
}

function jobPath(jobId, suffix = "") {
  return tablePath(`/enrich/jobs/${encodeURIComponent(jobId)}${suffix}`);
}

// --- the tables list (/) --------------------------------------------------------------------

async function initTablesPage() {
  $("#upload").addEventListener("submit", uploadCsv);
  try {
    const page = await api("GET", "/tables?limit=100");
    $("#tables tbody").replaceChildren(
      ...page.items.map((table) =>
        el(
          "tr",
          { "data-table-id": table.id },
          el("td", {}, el("a", { href: tableHref(table.id), title: table.description }, table.name)),
          el("td", { class: "num" }, Number(table.rowCount).toLocaleString()),
          el("td", {}, displayDate(table.createdAt)),
        ),
      ),
    );
    $("#tables-empty").hidden = page.items.length > 0;
  } catch (error) {
    showError(error);
  }
}

async function uploadCsv(event) {
  event.preventDefault();
  clearError();
  const form = new FormData(event.target);
  if (!form.get("name")) form.delete("name");
  $("#upload-status").textContent = "Uploading…";
  try {
    const table = await api("POST", "/tables", form);
    window.location.assign(tableHref(table.id));
  } catch (error) {
    $("#upload-status").textContent = "";
    showError(error);
  }
}

// --- the grid (/tables/{id}) ----------------------------------------------------------------

const grid = {
  tableId: "",
  columns: [],
  columnsByKey: new Map(),
  rows: [],
  rowsById: new Map(),
  cellsByRow: new Map(), // row id -> column key -> <td>
  page: 1,
  total: 0,
  rowReads: 0, // reads of rows asked for so far
  // Grid mode: columns × rows (no rows: every row). Cell mode: explicit "rowId\ncolumnId"s.
  selection: { columns: new Set(), rows: new Set(), cells: new Set() },
  job: null, // the job this page follows: {id, token, rank, progress, done, live, ...}
};

async function initTablePage() {
  grid.tableId = decodeURIComponent(window.location.pathname.split("/")[2] || "");
  $("#grid").addEventListener("click", onGridClick);
  $("#clear").addEventListener("click", () => setSelection(new Set(), new Set(), new Set()));
  $("#estimate").addEventListener("click", () => estimate().catch(showError));
  $("#run").addEventListener("click", () => run().catch(showError));
  $("#cancel").addEventListener("click", () => cancel().catch(showError));
  $("#refresh-jobs").addEventListener("click", () => loadJobs().catch(showError));
  $("#prev-page").addEventListener("click", () => turnPage(-1));
  $("#next-page").addEventListener("click", () => turnPage(1));
  try {
    await loadTable();
    await loadRows();
    await loadJobs({ resume: true });
  } catch (error) {
    showError(error);
  }
}

async function loadTable() {
  const table = await api("GET", tablePath());
  grid.columns = [...table.columns].sort((a, b) => a.position - b.position);
  grid.columnsByKey = new Map(grid.columns.map((column) => [column.key, column]));
  grid.total = table.rowCount;
  $("#table-name").textContent = table.name;
  document.title = `Glaze · ${table.name}`;
}

/** Read the current page of rows: the grid then shows exactly what is stored. */
async function loadRows() {
  const asked = ++grid.rowReads;
  const page = await api("GET", tablePath(`/rows?page=${grid.page}&limit=${ROWS_PER_PAGE}`));
  if (asked !== grid.rowReads) return; // a newer read is on its way: an older answer never wins
  grid.rows = page.items;
  grid.rowsById = new Map(grid.rows.map((row) => [row.id, row]));
  grid.total = page.total;
  if (grid.job && !grid.job.done) grid.job.live.forEach((cell) => applyCell(cell));
  renderGrid();
}

function turnPage(step) {
  const last = Math.max(1, Math.ceil(grid.total / ROWS_PER_PAGE));
  grid.page = Math.min(last, Math.max(1, grid.page + step));
  loadRows().catch(showError);
}

/** A column a job can fill: a catalogue field, or an AI column's question. */
function fillable(column) {
  return Boolean(column.field || column.prompt);
}

function renderGrid() {
  $("#grid thead tr").replaceChildren(
    el("th", { class: "rownum corner" }, "#"),
    el("th", { class: "row-status" }, "Status"),
    ...grid.columns.map((column) =>
      el(
        "th",
        {
          "data-column-id": column.id,
          "data-column-key": column.key,
          class: fillable(column) ? "column" : "column no-field",
          title: column.prompt
            ? `${column.key} is an AI column, asked once per company or person: ` +
              `"${column.prompt}". Click to select it`
            : column.field
              ? `${column.key} → ${column.field}: click to select the column`
              : `${column.key} maps to no field: it cannot be enriched`,
        },
        el("span", { class: "label" }, column.label),
        el(
          "span",
          { class: column.prompt ? "field ai" : "field" },
          column.prompt ? "AI column" : column.field || "no field",
        ),
      ),
    ),
  );
  grid.cellsByRow = new Map();
  $("#grid tbody").replaceChildren(...grid.rows.map(renderRow));
  const pages = Math.ceil(grid.total / ROWS_PER_PAGE);
  $("#pager").hidden = pages <= 1;
  $("#page-info").textContent = `Page ${grid.page} of ${pages} · ${grid.total} rows`;
  showSelection();
}

function renderRow(row) {
  const number = row.position + 1;
  const cells = new Map();
  grid.cellsByRow.set(row.id, cells);
  const rowTitle = [
    `row status: ${row.status}`,
    row.confidence != null ? `confidence: ${row.confidence.toFixed(2)}` : null,
    row.error ? `error: ${row.error}` : null,
  ].filter(Boolean);
  return el(
    "tr",
    { "data-row-id": row.id },
    el("td", { class: "rownum", "data-row-id": row.id, title: "Select the row" }, `${number}`),
    el(
      "td",
      { class: "row-status" },
      el("span", { class: `chip chip-${row.status}`, title: rowTitle.join("\n") }, row.status),
    ),
    ...grid.columns.map((column) => {
      const td = el("td", {
        "data-row-id": row.id,
        "data-column-key": column.key,
        "data-column-id": column.id,
      });
      cells.set(column.key, td);
      renderCell(td, row, column);
      return td;
    }),
  );
}

/** One cell: its value, its outcome as a class, confidence/source/status/error on hover. */
function renderCell(td, row, column) {
  const value = displayValue(row.data[column.key]);
  const meta = row.meta[column.key];
  td.textContent = value;
  td.className = meta && meta.status ? `cell cell-${meta.status}` : "cell";
  if (!fillable(column)) td.classList.add("no-field");
  const id = `${row.id}\n${column.key}`;
  const job = grid.job;
  if (isFollowing() && job.pending.has(id) && !job.live.has(id)) td.classList.add("pending");
  const lines = value.length > 40 ? [value] : [];
  if (meta && meta.source === "user") {
    lines.push(`edited by a user${meta.edited_at ? `: ${displayDate(meta.edited_at)}` : ""}`);
  } else if (meta) {
    lines.push(`status: ${meta.status}`);
    if (meta.confidence != null) lines.push(`confidence: ${Number(meta.confidence).toFixed(2)}`);
    if (meta.source) lines.push(`source: ${meta.source}`);
    if (meta.fetched_at) lines.push(`fetched: ${displayDate(meta.fetched_at)}`);
    if (meta.error) lines.push(`error: ${meta.error}`);
    if (meta.confidence != null) td.style.setProperty("--confidence", String(meta.confidence));
  }
  if (lines.length) td.title = lines.join("\n");
  else td.removeAttribute("title");
}

/** A cell the job wrote ({rowId, columnKey, value, status, confidence, source}). */
function applyCell(cell) {
  const row = grid.rowsById.get(cell.rowId);
  const column = grid.columnsByKey.get(cell.columnKey);
  if (!row || !column) return null; // on another page of rows
  if (cell.value !== null && cell.value !== undefined) row.data[cell.columnKey] = cell.value;
  const meta = { ...(row.meta[cell.columnKey] || {}), status: cell.status };
  if (cell.confidence != null) meta.confidence = cell.confidence;
  if (cell.source) meta.source = cell.source;
  row.meta[cell.columnKey] = meta;
  return { row, column };
}

function fillCell(cell) {
  grid.job.live.set(`${cell.rowId}\n${cell.columnKey}`, cell);
  const found = applyCell(cell);
  if (!found) return;
  const td = grid.cellsByRow.get(cell.rowId).get(cell.columnKey);
  renderCell(td, found.row, found.column);
  td.classList.add("just-filled");
  markSelected(td);
}

// --- selection ------------------------------------------------------------------------------

function onGridClick(event) {
  const target = event.target.closest("th[data-column-id], td.rownum[data-row-id], td.cell");
  if (!target) return;
  const { columns, rows, cells } = grid.selection;
  if (target.matches("th")) {
    if (target.classList.contains("no-field")) return;
    setSelection(toggled(columns, target.dataset.columnId), rows, new Set());
  } else if (target.matches("td.rownum")) {
    setSelection(columns, toggled(rows, target.dataset.rowId), new Set());
  } else if (!target.classList.contains("no-field")) {
    const id = `${target.dataset.rowId}\n${target.dataset.columnId}`;
    const additive = event.ctrlKey || event.metaKey || event.shiftKey;
    const only = cells.size === 1 && cells.has(id);
    setSelection(new Set(), new Set(), additive ? toggled(cells, id) : new Set(only ? [] : [id]));
  }
}

function toggled(set, item) {
  const copy = new Set(set);
  if (!copy.delete(item)) copy.add(item);
  return copy;
}

function setSelection(columns, rows, cells) {
  grid.selection = { columns, rows, cells };
  showSelection();
}

function isSelected(rowId, columnId) {
  const { columns, rows, cells } = grid.selection;
  if (cells.size) return cells.has(`${rowId}\n${columnId}`);
  return columns.has(columnId) && (rows.size === 0 || rows.has(rowId));
}

function markSelected(td) {
  td.classList.toggle("selected", isSelected(td.dataset.rowId, td.dataset.columnId));
}

function selectedCount() {
  const { columns, rows, cells } = grid.selection;
  return cells.size || columns.size * (rows.size || grid.total);
}

/** The selection as the API's body: explicit cells, or columns × rows. */
function selectionBody() {
  const { columns, rows, cells } = grid.selection;
  if (cells.size) {
    return {
      cellIds: [...cells].map((id) => {
        const [rowId, columnId] = id.split("\n");
        return { rowId, columnId };
      }),
    };
  }
  return rows.size ? { columnIds: [...columns], rowIds: [...rows] } : { columnIds: [...columns] };
}

function showSelection() {
  const { columns, rows, cells } = grid.selection;
  document.querySelectorAll("#grid thead th[data-column-id]").forEach((th) => {
    th.classList.toggle("selected", columns.has(th.dataset.columnId));
  });
  document.querySelectorAll("#grid td.rownum").forEach((td) => {
    td.classList.toggle("selected", rows.has(td.dataset.rowId));
  });
  document.querySelectorAll("#grid td.cell").forEach(markSelected);
  const count = selectedCount();
  const label = count === 1 ? "1 cell selected" : `${count} cells selected`;
  $("#selection-count").textContent =
    rows.size && !columns.size && !cells.size ? `${label} (pick columns too)` : label;
  updateButtons();
}

/** Estimate and Run need a selection; Run and Cancel depend on the job being followed. */
function updateButtons() {
  const count = selectedCount();
  const job = grid.job;
  $("#estimate").disabled = count === 0;
  $("#run").disabled = count === 0 || isFollowing();
  $("#cancel").disabled = !isFollowing() || !job.id || Boolean(job.cancelling);
}

// --- jobs: run, follow, cancel --------------------------------------------------------------

function isFollowing() {
  return Boolean(grid.job && !grid.job.done);
}

function countsText(job) {
  const count = (n) => n || 0;
  return (
    `done ${count(job.doneTasks)} · not found ${count(job.notFoundTasks)} · ` +
    `failed ${count(job.failedTasks)} · skipped ${count(job.skippedTasks)}`
  );
}

function statusText(job) {
  if (job.cancelling && !ENDED.has(job.status)) return "Cancelling…";
  switch (job.status) {
    case "starting":
      return "Starting…";
    case "pending":
      return "In Queue…";
    case "running":
      return `Enriching… ${job.progress || 0}%`;
    case "completed":
      if (job.failedTasks > 0) return `Enriched with ${job.failedTasks} failed`;
      // partial without a failure: cells skipped (a budget, say); the title says why
      return job.state === "partial" ? `Enriched with ${job.skippedTasks || 0} skipped` : "Enriched!";
    case "failed":
      return `Failed: ${job.error || "no reason given"}`;
    case "cancelled":
      return "Cancelled";
    default:
      return job.status;
  }
}

/** Show a job's state in the header (and its progress bar while it works). */
function showStatus(job) {
  const status = $("#job-status");
  status.textContent = statusText(job);
  status.dataset.status = job.status;
  const ending = [countsText(job), job.error].filter(Boolean).join("\n");
  status.title = ENDED.has(job.status) ? ending : job.message || "";
  const working = !ENDED.has(job.status);
  $("#job-progress").hidden = !working;
  $(".progress-bar").style.width = `${working ? job.progress || 0 : 100}%`;
  updateButtons();
}

async function run() {
  const body = selectionBody();
  clearError();
  stopFollowing();
  const pending = new Set();
  document.querySelectorAll("#grid td.selected").forEach((td) => {
    td.classList.add("pending");
    pending.add(`${td.dataset.rowId}\n${td.dataset.columnKey}`);
  });
  grid.job = { id: null, status: "starting", rank: 0, progress: 0, live: new Map(), pending };
  showStatus(grid.job);
  let answer;
  try {
    answer = await api("POST", tablePath("/enrich"), body);
  } catch (error) {
    grid.job = null;
    showStatus({ status: "failed", error: error.message });
    document.querySelectorAll("#grid td.pending").forEach((td) => td.classList.remove("pending"));
    throw error;
  }
  follow(answer.jobId, answer.publicAccessToken, answer);
  loadJobs().catch(showError);
}

/** Follow a job: its SSE stream when a token allows, else poll its endpoint every second. */
function follow(jobId, token, state) {
  const job =
    grid.job && grid.job.id === null
      ? grid.job
      : { rank: 0, progress: 0, live: new Map(), pending: new Set() };
  Object.assign(job, { id: jobId, token, done: false, errors: 0, source: null, timer: null });
  grid.job = job;
  update(job, state);
  if (token && "EventSource" in window) listen(job);
  else poll(job);
}

function listen(job) {
  const url = `/realtime/jobs/${encodeURIComponent(job.id)}?token=${encodeURIComponent(job.token)}`;
  const source = new EventSource(url);
  job.source = source;
  $("#job-status").dataset.transport = "stream";
  const on = (name, handle) =>
    source.addEventListener(name, (event) => {
      if (grid.job === job && !job.done) handle(JSON.parse(event.data));
    });
  // An ending comes with its counters in `finished` (always the last event): wait for it.
  on("status", (data) => ENDED.has(data.status) || update(job, data));
  on("progress", (data) =>
    update(job, { ...data, status: data.phase === "queued" ? "pending" : "running" }),
  );
  on("cells", (data) => data.cells.forEach(fillCell));
  on("finished", (data) => finish(job, data).catch(showError));
  source.addEventListener("open", () => {
    job.errors = 0;
  });
  source.addEventListener("error", () => {
    if (job.done) return;
    job.errors += 1;
    if (source.readyState === EventSource.CLOSED || job.errors >= STREAM_ERRORS_BEFORE_POLLING) {
      source.close();
      poll(job);
    }
  });
}

function poll(job) {
  $("#job-status").dataset.transport = "poll";
  const tick = async () => {
    if (grid.job !== job || job.done) return;
    try {
      const state = await api("GET", jobPath(job.id));
      if (ENDED.has(state.status)) await finish(job, state);
      else update(job, state);
    } catch (error) {
      showError(error);
      // Not signed in, not allowed, or no such job: asking again every second will not help.
      if (error instanceof ApiError && error.status < 500) {
        job.done = true;
        updateButtons();
      }
    }
    if (grid.job === job && !job.done) job.timer = setTimeout(tick, POLL_MS);
  };
  tick();
}

/** A newer state of the followed job (never an older one: the status only moves forward). */
function update(job, state) {
  const rank = RANK[state.status] ?? 0;
  if (rank < job.rank) return;
  const wasRunning = job.status === "running";
  job.rank = rank;
  Object.assign(job, state, { id: job.id, progress: state.progress ?? job.progress });
  showStatus(job);
  // Rows held by the job show `running`: read them once when it starts working on them.
  if (!wasRunning && job.status === "running") loadRows().catch(showError);
}

/** The job ended: read the rows once (the grid is then what is stored), then say how it went. */
async function finish(job, state) {
  if (job.done) return;
  job.done = true;
  closeStream(job);
  job.rank = RANK[state.status];
  Object.assign(job, state, { id: job.id });
  try {
    await loadRows();
  } finally {
    job.live.forEach((cell) => {
      const td = grid.cellsByRow.get(cell.rowId)?.get(cell.columnKey);
      if (td) td.classList.add("just-filled"); // what this job wrote, once more
    });
    showStatus(job);
    loadJobs().catch(showError);
  }
}

function closeStream(job) {
  if (job.source) job.source.close();
  if (job.timer) clearTimeout(job.timer);
  job.source = null;
  job.timer = null;
}

function stopFollowing() {
  if (grid.job) {
    grid.job.done = true;
    closeStream(grid.job);
  }
}

async function cancel() {
  const job = grid.job;
  if (!job || job.done || !job.id) return;
  job.cancelling = true;
  showStatus(job);
  try {
    await api("POST", jobPath(job.id, "/cancel"));
  } catch (error) {
    job.cancelling = false; // e.g. it ended meanwhile: its `finished` says how
    if (!job.done) showStatus(job);
    throw error;
  }
}

// --- estimate -------------------------------------------------------------------------------

async function estimate() {
  clearError();
  $("#estimate-panel").hidden = false;
  const result = $("#estimate-result");
  result.replaceChildren(el("p", { class: "muted" }, "Estimating…"));
  let job = await api("POST", `/v2${tablePath("/enrich/estimate")}?wait=20`, selectionBody());
  for (let tries = 0; !job.estimate && !ENDED.has(job.status) && tries < 120; tries += 1) {
    await sleep(POLL_MS);
    job = await api("GET", jobPath(job.jobId));
  }
  loadJobs().catch(showError);
  if (!job.estimate) {
    const reason = job.error || `The estimate is ${job.status}.`;
    result.replaceChildren(el("p", { class: "error-text" }, reason));
    return;
  }
  const e = job.estimate;
  const providers = Object.entries(e.providers || {});
  result.replaceChildren(
    el(
      "dl",
      { class: "facts" },
      ...fact("Cells", e.cells),
      ...fact("Unique entities", e.uniqueEntities),
      ...fact("Cache hits", e.cacheHits),
      ...fact("Without identifier", e.cellsWithoutIdentifier),
      ...fact("Expected filled", e.expectedCellsFilled),
      ...fact("Provider unavailable", e.cellsProviderUnavailable),
    ),
    el(
      "table",
      { class: "list", id: "estimate-providers" },
      el(
        "thead",
        {},
        el(
          "tr",
          {},
          el("th", {}, "Provider"),
          el("th", {}, "Status"),
          el("th", { class: "num" }, "Calls"),
          el("th", { class: "num" }, "Expected"),
          el("th", { class: "num" }, "At most"),
        ),
      ),
      el(
        "tbody",
        {},
        ...providers.map(([name, p]) =>
          el(
            "tr",
            { "data-provider": name, title: basisText(p) },
            el("td", {}, name),
            el(
              "td",
              { class: p.status === "ok" ? "" : "error-text" },
              p.reason ? `${p.status}: ${p.reason}` : p.status,
            ),
            el("td", { class: "num" }, displayCost(p.expectedCalls)),
            el("td", { class: "num" }, displayCost(p.expectedCost)),
            el("td", { class: "num" }, displayCost(p.maxCost)),
          ),
        ),
      ),
      el(
        "tfoot",
        {},
        el(
          "tr",
          {},
          el("th", { colspan: "3" }, "Cost"),
          el("th", { class: "num", id: "estimate-cost" }, displayCost(e.expectedCost)),
          el("th", { class: "num", id: "estimate-max" }, displayCost(e.maxCost)),
        ),
      ),
    ),
    el(
      "p",
      { class: "muted", id: "estimate-range" },
      e.expectedCostRange
        ? `About 95% of runs cost ${displayCost(e.expectedCostRange[0])} to ${displayCost(e.expectedCostRange[1])}.`
        : "",
    ),
    el("p", { class: "muted", id: "estimate-guidance" }, e.guidance || ""),
  );
}

// Where an expected figure comes from, per kind of key ("by domain: from 2,300 lookups ...").
function basisText(provider) {
  return Object.entries(provider.byKeyKind || {})
    .map(([kind, b]) => `by ${kind}: ${b.basis}`)
    .join("; ");
}

function fact(label, value) {
  return [el("dt", {}, label), el("dd", {}, Number(value || 0).toLocaleString())];
}

// --- job history and failed cells -----------------------------------------------------------

async function loadJobs({ resume = false } = {}) {
  const page = await api("GET", tablePath("/enrich/jobs?limit=10"));
  $("#jobs tbody").replaceChildren(...page.items.map(renderJob));
  $("#jobs-empty").hidden = page.items.length > 0;
  // A job still working when the page opens: follow its stream with a fresh token (polling
  // when none can be had).
  const working = page.items.find((job) => job.kind === "enrich" && !ENDED.has(job.status));
  if (resume && working && !grid.job) {
    let token = null;
    try {
      const issued = await api("POST", tablePath(`/enrich/jobs/${encodeURIComponent(working.jobId)}/token`));
      token = issued.publicAccessToken;
    } catch {
      token = null;
    }
    if (!grid.job) follow(working.jobId, token, working);
  }
}

function renderJob(job) {
  const answered = job.doneTasks + job.notFoundTasks + job.failedTasks + job.skippedTasks;
  const cells = job.kind === "enrich" ? `${answered}/${job.totalTasks}` : `${job.totalTasks}`;
  let failed = null;
  if (job.failedTasks > 0) {
    const attrs = { class: "link-button", type: "button", "data-job-id": job.jobId };
    failed = el("button", attrs, `${job.failedTasks} failed`);
    failed.addEventListener("click", () => loadFailed(job).catch(showError));
  }
  return el(
    "tr",
    { "data-job-id": job.jobId, "data-status": job.status },
    el(
      "td",
      { title: `${job.jobId}, ${displayDate(job.createdAt)}` },
      displayWhen(job.createdAt),
      job.kind === "enrich" ? null : el("span", { class: "kind" }, job.kind),
    ),
    el(
      "td",
      {},
      el("span", { class: `chip chip-job-${job.status}`, title: job.error || "" }, job.state),
      failed,
    ),
    el("td", { class: "num", title: countsText(job) }, cells),
    el("td", { class: "num" }, displayCost(job.cost)),
  );
}

async function loadFailed(job) {
  const page = await api("GET", jobPath(job.jobId, "/tasks?status=failed&limit=50"));
  $("#failed-panel").hidden = false;
  $("#failed-job").textContent = `${page.total} in job ${job.jobId}`;
  $("#failed-cells tbody").replaceChildren(
    ...page.items.map((task) => {
      const row = grid.rowsById.get(task.rowId);
      return el(
        "tr",
        { "data-row-id": task.rowId, "data-column-key": task.columnKey },
        el("td", { title: task.rowId }, row ? String(row.position + 1) : task.rowId),
        el("td", {}, task.columnKey),
        el("td", { class: "error-text" }, task.error || ""),
      );
    }),
  );
}

// --- start ----------------------------------------------------------------------------------

document.addEventListener("DOMContentLoaded", () => {
  if (document.body.dataset.page === "table") initTablePage();
  else initTablesPage();
});
