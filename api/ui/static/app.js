// The sdqueue playground: a form over POST /api/v1/generate, live progress from the task's events,
// a gallery of results and the key's queue. It uses only the public native API (docs/api.md).
import {followEvents, StreamRefused, StreamUnavailable} from "./sse.js";

// Relative to /ui/, so the page works under a stage prefix (/prod/ui/) as well.
const API_BASE = new URL("../api/v1/", document.baseURI);
const KEY_STORAGE = "sdqueue.playground.apiKey";
const KEY_HEADER = "X-API-Key";
// Without the event stream, long-poll the task. ?wait= ends early only when the task ends, so a
// short wait keeps the bar and the queue position moving; the end still arrives at once.
const POLL_WAIT_SECONDS = 2;
const QUEUE_REFRESH_MS = 3000;
const TERMINAL = new Set(["completed", "failed", "cancelled"]);
const NUMBER_FIELDS = ["width", "height", "num_inference_steps", "guidance_scale", "seed", "num_images"];

const $ = (id) => document.getElementById(id);
const state = {models: [], schedulers: [], jobs: new Map(), currentTaskId: null, queueTimer: null};

class ApiError extends Error {
  constructor(status, detail) {
    super(describeDetail(detail).text || `HTTP ${status}`);
    this.status = status;
    this.detail = detail;
  }
}

// ---- the API -------------------------------------------------------------------------------

function apiKey() {
  return $("api-key").value.trim();
}

function authHeaders() {
  return {[KEY_HEADER]: apiKey()};
}

async function api(path, {method = "GET", body} = {}) {
  const headers = authHeaders();
  if (body !== undefined) headers["Content-Type"] = "application/json";
  const response = await fetch(new URL(path, API_BASE), {
    method, headers, cache: "no-store", body: body === undefined ? undefined : JSON.stringify(body),
  });
  const payload = await response.json().catch(() => null);
  if (!response.ok) throw new ApiError(response.status, payload?.detail ?? `HTTP ${response.status}`);
  return {status: response.status, body: payload};
}

/** The API's `detail` as a sentence, and the request fields it names: a string, a list of
 *  {loc, msg} (422) or an object of field -> messages. */
function describeDetail(detail) {
  if (typeof detail === "string") return {text: detail, fields: []};
  if (Array.isArray(detail)) {
    const entries = detail.map((item) => {
      const loc = (item.loc || []).filter((part) => part !== "body");
      return {field: loc.join("."), msg: item.msg ?? JSON.stringify(item)};
    });
    return {text: entries.map((e) => (e.field ? `${e.field}: ${e.msg}` : e.msg)).join("; "),
            fields: entries.map((e) => e.field).filter(Boolean)};
  }
  if (detail && typeof detail === "object") {
    const fields = Object.keys(detail);
    const text = fields.map((f) => `${f}: ${[].concat(detail[f]).join(", ")}`).join("; ");
    return {text, fields};
  }
  return {text: String(detail ?? ""), fields: []};
}

// ---- messages ------------------------------------------------------------------------------

function showError(error) {
  const text = error instanceof ApiError ? error.message : `Could not reach the API: ${error.message || error}`;
  $("messages").textContent = text;   // never hidden: a live region must stay in the tree to be announced
  markInvalidFields(error instanceof ApiError ? describeDetail(error.detail).fields : []);
}

function clearError() {
  $("messages").textContent = "";
  markInvalidFields([]);
}

/** aria-invalid on the controls the API named, so screen readers and styles point at them. */
function markInvalidFields(fields) {
  const names = new Set(fields.map((f) => f.split(".")[0]));
  for (const control of $("generate-form").elements) {
    if (!control.name) continue;
    if (names.has(control.name)) {
      control.setAttribute("aria-invalid", "true");
      control.setAttribute("aria-errormessage", "messages");
    } else {
      control.removeAttribute("aria-invalid");
      control.removeAttribute("aria-errormessage");
    }
  }
}

function notice(text) {
  $("queue-status").textContent = text;
}

// ---- the key -------------------------------------------------------------------------------

function restoreKey() {
  $("api-key").value = localStorage.getItem(KEY_STORAGE) || "";
}

function keyChanged() {
  const key = apiKey();
  if (key) localStorage.setItem(KEY_STORAGE, key);
  else localStorage.removeItem(KEY_STORAGE);
  loadCatalog();
  refreshQueue();
}

function forgetKey() {
  $("api-key").value = "";
  keyChanged();
  $("api-key").focus();
}

// ---- models and schedulers -----------------------------------------------------------------

async function loadCatalog() {
  if (!apiKey()) {
    $("job-status").textContent = "Enter your API key to load the models.";
    return;
  }
  try {
    const [models, schedulers] = await Promise.all([api("models"), api("schedulers")]);
    state.models = models.body.models.filter((m) => m.txt2img !== false && !m.problem);
    state.schedulers = schedulers.body.schedulers;
    fillModelSelect(models.body.default);
    clearError();
  } catch (error) {
    showError(error);
  }
}

function fillModelSelect(defaultName) {
  const select = $("model");
  const previous = select.value;
  select.replaceChildren(...state.models.map((m) => new Option(modelLabel(m), m.name)));
  select.value = state.models.some((m) => m.name === previous) ? previous : (defaultName || "");
  applyModel(selectedModel());
}

function modelLabel(model) {
  const family = model.family_label || model.family || "";
  return family ? `${model.name} (${family})` : model.name;
}

function selectedModel() {
  return state.models.find((m) => m.name === $("model").value) || null;
}

/** A model's defaults into the form, and only the schedulers that run its schedule. */
function applyModel(model) {
  if (!model) return;
  const defaults = model.defaults || {};
  setValue("width", defaults.width ?? model.width);
  setValue("height", defaults.height ?? model.height);
  setValue("num_inference_steps", defaults.steps);
  setValue("guidance_scale", defaults.guidance_scale);
  for (const id of ["width", "height"]) $(id).step = model.size_multiple || 8;
  const negative = $("negative_prompt");
  negative.disabled = model.negative_prompt === false;
  $("negative-hint").textContent = negative.disabled ? "(this model takes none)" : "(optional)";
  fillSchedulerSelect(model.schedule);
}

function fillSchedulerSelect(schedule) {
  const select = $("scheduler");
  const previous = select.value;
  const usable = state.schedulers.filter((s) => !schedule || s.schedule === schedule);
  select.replaceChildren(new Option("(the model's default)", ""), ...usable.map((s) => new Option(s.name, s.name)));
  select.value = usable.some((s) => s.name === previous) ? previous : "";
}

function setValue(id, value) {
  if (value !== undefined && value !== null) $(id).value = value;
}

// ---- the form ------------------------------------------------------------------------------

/** The request body: blank fields are left to the API's defaults. */
function readForm() {
  const form = $("generate-form").elements;
  const body = {prompt: form.prompt.value};
  if (form.negative_prompt.value.trim() && !form.negative_prompt.disabled) body.negative_prompt = form.negative_prompt.value;
  if (form.model.value) body.model = form.model.value;
  if (form.scheduler.value) body.scheduler = form.scheduler.value;
  for (const name of NUMBER_FIELDS) {
    const raw = form[name].value.trim();
    if (raw !== "") body[name] = Number(raw);
  }
  const previewEvery = Number(form.preview_every.value || 0);
  if (previewEvery > 0) body.preview_every = previewEvery;
  return body;
}

/** The settings of a result back into the form (the model first: choosing it resets sizes). */
function fillForm(settings) {
  const form = $("generate-form").elements;
  if (settings.model && state.models.some((m) => m.name === settings.model)) {
    form.model.value = settings.model;
    applyModel(selectedModel());
  }
  form.prompt.value = settings.prompt ?? "";
  form.negative_prompt.value = settings.negative_prompt ?? "";
  form.scheduler.value = settings.scheduler ?? "";
  for (const name of NUMBER_FIELDS) setValue(name, settings[name]);
  form.preview_every.value = settings.preview_every ?? 0;
  clearError();
  form.prompt.focus();
}

async function submitForm(event) {
  event.preventDefault();
  clearError();
  if (!apiKey()) {
    showError(new ApiError(401, "Enter your API key first."));
    $("api-key").focus();
    return;
  }
  const button = $("generate");
  button.disabled = true;   // one click, one job: no double submissions while the POST is in flight
  const body = readForm();
  try {
    const created = await api("generate", {method: "POST", body});
    trackJob(created.body.task_id, body);
    refreshQueue();
  } catch (error) {
    showError(error);
  } finally {
    button.disabled = false;
  }
}

// ---- following a job -----------------------------------------------------------------------

function trackJob(taskId, request) {
  state.jobs.set(taskId, {request});
  state.currentTaskId = taskId;
  $("job-progress").value = 0;
  $("job-progress").removeAttribute("aria-valuetext");
  $("preview").hidden = true;
  $("job-status").dataset.taskId = taskId;
  setJobStatus(taskId, "Queued.");
  followJob(taskId);
}

async function followJob(taskId) {
  let final;
  try {
    const url = new URL(`tasks/${encodeURIComponent(taskId)}/events`, API_BASE);
    final = (await followEvents(url, authHeaders(), (type, data) => onEvent(taskId, type, data))).data;
  } catch (error) {
    if (error instanceof StreamRefused) return showError(new ApiError(error.status, error.body?.detail));
    if (!(error instanceof StreamUnavailable)) return showError(error);
    final = await pollUntilDone(taskId).catch((e) => { showError(e); return null; });
  }
  if (final) finishJob(taskId, final);
}

/** Long-polling, for a service without the events route or with every stream slot taken. */
async function pollUntilDone(taskId) {
  for (;;) {
    const {body} = await api(`tasks/${encodeURIComponent(taskId)}?wait=${POLL_WAIT_SECONDS}`);
    if (TERMINAL.has(body.status)) return body;
    showTaskState(taskId, body);
  }
}

function onEvent(taskId, type, data) {
  if (type === "queued") setJobStatus(taskId, queuedText(data.queue_position));
  else if (type === "started") setJobStatus(taskId, `Running${data.worker ? ` on ${data.worker}` : ""}…`);
  else if (type === "progress") showProgress(taskId, data.step, data.total, data.eta_seconds);
  else if (type === "preview") showPreview(taskId, data);
}

function showTaskState(taskId, task) {
  if (task.status === "pending") setJobStatus(taskId, queuedText(task.queue_position));
  else if (task.progress?.total) showProgress(taskId, task.progress.step, task.progress.total);
  else setJobStatus(taskId, "Running…");
}

function queuedText(position) {
  return position ? `Waiting in the queue (position ${position}).` : "Waiting in the queue.";
}

function showProgress(taskId, step, total, eta) {
  if (taskId !== state.currentTaskId || !total) return;
  const bar = $("job-progress");
  bar.value = Math.min(1, step / total);
  bar.setAttribute("aria-valuetext", `step ${step} of ${total}`);
  const etaText = eta ? `, about ${eta < 10 ? eta.toFixed(1) : Math.round(eta)} s left` : "";
  setJobStatus(taskId, `Step ${step} of ${total}${etaText}.`);
}

function showPreview(taskId, data) {
  if (taskId !== state.currentTaskId || !String(data.image || "").startsWith("data:image/")) return;
  $("preview-image").src = data.image;
  $("preview-caption").textContent = `Preview at step ${data.step} of ${data.total}`;
  $("preview").hidden = false;
}

function setJobStatus(taskId, text) {
  if (taskId !== state.currentTaskId) return;
  const prompt = state.jobs.get(taskId)?.request.prompt || "";
  $("job-status").textContent = `${text}${prompt ? ` — “${truncate(prompt, 60)}”` : ""}`;
}

function finishJob(taskId, task) {
  const job = state.jobs.get(taskId);
  if (task.status === "completed") {
    if (taskId === state.currentTaskId) $("job-progress").value = 1;
    const count = resultUrls(task).length;
    setJobStatus(taskId, `Done: ${count} image${count === 1 ? "" : "s"}.`);
    addToGallery(task, job.request);
  } else if (task.status === "failed") {
    setJobStatus(taskId, "Failed.");
    showError(new ApiError(0, `The job failed: ${task.error_message || "no reason given"}`));
  } else {
    setJobStatus(taskId, "Cancelled.");
  }
  refreshQueue();
}

function resultUrls(task) {
  return task.result_urls || (task.result_url ? [task.result_url] : []);
}

// ---- the gallery ---------------------------------------------------------------------------

function addToGallery(task, request) {
  const urls = resultUrls(task);
  const cards = urls.map((url, index) => galleryCard(url, index, task, request));
  $("gallery").prepend(...cards);   // newest first, a job's images in their order
  $("gallery-empty").hidden = true;
}

function galleryCard(url, index, task, request) {
  const card = $("card-template").content.firstElementChild.cloneNode(true);
  const seed = task.seeds?.[index];
  const settings = {...request, model: task.model || request.model, seed: seed ?? request.seed};
  card.dataset.taskId = task.task_id;
  card.querySelector("a").href = url;
  const image = card.querySelector("img");
  image.src = url;
  image.alt = `Result ${index + 1} of ${resultUrls(task).length}: ${request.prompt}`;
  card.querySelector(".params").append(...paramRows(settings));
  const reuse = card.querySelector(".reuse");
  reuse.setAttribute("aria-label", `Reuse these settings (seed ${seed ?? "random"})`);
  reuse.addEventListener("click", () => fillForm({...settings, num_images: 1}));
  return card;
}

function paramRows(settings) {
  const rows = [
    ["Prompt", settings.prompt],
    ["Negative", settings.negative_prompt],
    ["Seed", settings.seed],
    ["Size", settings.width && settings.height ? `${settings.width} × ${settings.height}` : "model default"],
    ["Steps", settings.num_inference_steps ?? "model default"],
    ["Guidance", settings.guidance_scale ?? "model default"],
    ["Scheduler", settings.scheduler || "model default"],
    ["Model", settings.model || "default"],
  ];
  return rows.filter(([, value]) => value !== undefined && value !== "").flatMap(([name, value]) => {
    const term = document.createElement("dt");
    term.textContent = name;
    const description = document.createElement("dd");
    description.textContent = String(value);
    description.className = `param-${name.toLowerCase()}`;
    return [term, description];
  });
}

// ---- the key's queue -----------------------------------------------------------------------

async function refreshQueue() {
  clearTimeout(state.queueTimer);
  if (apiKey() && document.visibilityState !== "hidden") {
    try {
      const [processing, pending] = await Promise.all(
        ["processing", "pending"].map((status) => api(`tasks?status=${status}&limit=100`)));
      renderQueue([...processing.body.tasks, ...pending.body.tasks]);
    } catch (error) {
      if (error instanceof ApiError) showError(error);   // a network blip is retried by the next refresh
    }
  } else if (!apiKey()) {
    renderQueue([]);
  }
  clearTimeout(state.queueTimer);   // refreshes that overlapped leave one timer, not one each
  state.queueTimer = setTimeout(refreshQueue, QUEUE_REFRESH_MS);
}

function renderQueue(tasks) {
  const list = $("queue");
  // A keyboard user on a Cancel button keeps the focus across the refresh (the rows are rebuilt).
  const focusedTask = document.activeElement?.closest?.(".queue-row")?.dataset.taskId;
  list.replaceChildren(...tasks.map(queueRow));
  $("queue-empty").hidden = tasks.length > 0;
  if (focusedTask) list.querySelector(`[data-task-id="${CSS.escape(focusedTask)}"] button`)?.focus();
}

function queueRow(task) {
  const row = document.createElement("li");
  row.className = "queue-row";
  row.dataset.taskId = task.task_id;
  const label = jobLabel(task.task_id);
  const text = document.createElement("span");
  text.className = "queue-text";
  text.textContent = `${label} · ${task.model || ""} · ${queueState(task)}`;
  const cancel = document.createElement("button");
  cancel.type = "button";
  cancel.className = "secondary danger";
  cancel.textContent = "Cancel";
  cancel.setAttribute("aria-label", `Cancel job ${label}`);
  cancel.addEventListener("click", () => cancelJob(task.task_id, cancel));
  row.append(text, cancel);
  return row;
}

function jobLabel(taskId) {
  const prompt = state.jobs.get(taskId)?.request.prompt;
  return prompt ? `“${truncate(prompt, 40)}”` : `task ${taskId.slice(0, 8)}`;
}

function queueState(task) {
  if (task.status === "pending") return task.queue_position ? `waiting, #${task.queue_position}` : "waiting";
  const fraction = task.progress?.fraction || 0;
  return `running, ${Math.round(fraction * 100)}%`;
}

async function cancelJob(taskId, button) {
  button.disabled = true;
  try {
    const {status} = await api(`tasks/${encodeURIComponent(taskId)}`, {method: "DELETE"});
    notice(status === 202 ? `Stopping job ${jobLabel(taskId)} at its next step.` : `Cancelled job ${jobLabel(taskId)}.`);
  } catch (error) {
    showError(error);
    button.disabled = false;
  }
  refreshQueue();
}

function truncate(text, length) {
  return text.length > length ? `${text.slice(0, length - 1)}…` : text;
}

// ---- start ---------------------------------------------------------------------------------

function start() {
  restoreKey();
  $("api-key").addEventListener("change", keyChanged);
  $("forget-key").addEventListener("click", forgetKey);
  $("model").addEventListener("change", () => applyModel(selectedModel()));
  $("generate-form").addEventListener("submit", submitForm);
  document.addEventListener("visibilitychange", () => { if (document.visibilityState === "visible") refreshQueue(); });
  clearError();
  loadCatalog();
  refreshQueue();
}

start();
