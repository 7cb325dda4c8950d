// The playground's wiring: key and balance, model picker, submit (POST /v2/{slug}), live status,
// the result and what it cost, the key's gallery, and the form as code.
import { balanceView, galleryView, recalled, rememberRun } from "./account.js";
import { getJson, imageSource, isCancelled, keyHeaders, money } from "./api.js";
import { codeBox } from "./codebox.js";
import { follow } from "./follow.js";
import { buildForm } from "./form.js";

const KEY_STORAGE = "qwenserve.apiKey";
const MODEL_STORAGE = "qwenserve.model";
const KEY_SETTLE_MS = 400; // a typed or pasted key is looked up once it stops changing
const IDLE = "Nothing submitted yet.";

const $ = (id) => document.getElementById(id);
const ui = {
  key: $("api-key"),
  forget: $("forget-key"),
  model: $("model"),
  modelHelp: $("model-help"),
  form: $("run-form"),
  formNote: $("form-note"),
  fields: $("fields"),
  submit: $("submit"),
  cancel: $("cancel"),
  banner: $("banner"),
  notice: $("notice"),
  status: $("status"),
  statusText: $("status-text"),
  statusDetail: $("status-detail"),
  progress: $("progress"),
  result: $("result"),
  image: $("result-image"),
  facts: $("result-facts"),
  download: $("download"),
  version: $("version"),
};

let form = null;
let card = null; // GET /v1/models/{slug} of the form shown
let running = null; // {id, abort: AbortController}
const balance = balanceView($("balance"));
const gallery = galleryView($("gallery"), $("gallery-empty"), pick);
const renderCode = codeBox();
const currentKey = () => ui.key.value.trim();

function showBanner(message) {
  ui.banner.textContent = message;
  ui.banner.hidden = !message;
}

/** The status line; `tone` styles it: "" (working), "done", "cancelled" or "failed". */
function setStatus(text, detail = "", fraction = null, tone = "") {
  ui.statusText.textContent = text;
  ui.statusDetail.textContent = detail;
  ui.status.dataset.tone = tone;
  ui.progress.hidden = fraction === null;
  if (fraction !== null) ui.progress.value = fraction;
}

/** Back to a blank result: no image, status, banner or field errors of an earlier run. */
function clearResult() {
  ui.result.hidden = true;
  ui.facts.replaceChildren();
  setStatus(IDLE);
  showBanner("");
  ui.formNote.textContent = "";
  form?.clearErrors();
}

function etaText(eta) {
  if (eta === null || eta === undefined) return "";
  return eta < 1 ? "less than a second left" : `about ${Math.round(eta)} s left`;
}

/** One status update (an SSE event's data or a status poll) onto the page. */
function showUpdate(update) {
  const eta = etaText(update.eta_s);
  if (update.type === "cancel_requested" || (update.cancel_requested && !update.progress)) {
    setStatus("Cancelling…", "", ui.progress.hidden ? null : ui.progress.value);
  } else if (update.status === "QUEUED") {
    const position = update.queue_position;
    const where =
      position === null || position === undefined
        ? "Queued"
        : position === 0
          ? "Queued: next in line"
          : `Queued: ${position} ahead`;
    setStatus(where, eta, 0);
  } else if (update.status === "PROCESSING") {
    if (update.progress) {
      const { step, total_steps: total, fraction } = update.progress;
      setStatus(`Step ${step} of ${total}`, eta, fraction);
    } else {
      setStatus(update.waiting ? "Waiting for the worker (loading, or behind a batch)" : "Started", eta, 0);
    }
    if (update.cancel_requested) ui.statusDetail.textContent = "Cancelling…";
  } else if (update.status === "COMPLETED") {
    setStatus("Completed: fetching the result…", "", 1);
  }
}

function codeContext() {
  if (!form || !card) return null;
  const slug = ui.form.dataset.slug;
  return { origin: location.origin, slug, kind: card.kind, schema: card.input_schema, entries: form.entries() };
}

const updateCode = () => renderCode(codeContext());

async function loadModels() {
  const { response, body } = await getJson("/v1/models");
  if (!response.ok) {
    showBanner(`Could not list the models: ${body.error ?? response.status}`);
    return;
  }
  ui.model.replaceChildren();
  for (const entry of body.data) {
    const option = document.createElement("option");
    option.value = entry.id;
    option.textContent = `${entry.title} (${entry.id}) · ${entry.kind}`;
    option.dataset.description = entry.description;
    option.dataset.price = entry.price_usd;
    ui.model.append(option);
  }
  const saved = localStorage.getItem(MODEL_STORAGE);
  if (saved && body.data.some((entry) => entry.id === saved)) ui.model.value = saved;
  await loadForm();
}

/** Build the form of the model picked; true once it is shown. */
async function loadForm() {
  const slug = ui.model.value;
  if (!slug) return false;
  localStorage.setItem(MODEL_STORAGE, slug);
  const chosen = ui.model.selectedOptions[0];
  ui.modelHelp.textContent = `${chosen.dataset.description} ${money(Number(chosen.dataset.price))} per run.`;
  ui.fields.setAttribute("aria-busy", "true");
  const { response, body } = await getJson(`/v1/models/${encodeURIComponent(slug)}`);
  ui.fields.removeAttribute("aria-busy");
  if (!response.ok) {
    showBanner(`Could not load ${slug}: ${body.error ?? response.status}`);
    return false;
  }
  if (ui.model.value !== slug) return false; // another model was picked meanwhile
  card = body;
  form = buildForm(ui.fields, body.input_schema);
  ui.form.dataset.slug = slug;
  updateCode();
  return true;
}

/** A gallery tile was clicked: its model, then its parameters, into the form. */
async function pick(record, result) {
  if (![...ui.model.options].some((option) => option.value === record.model)) {
    showBanner(`${record.model} is not served here any more.`);
    return;
  }
  if (ui.model.value !== record.model || !form) {
    ui.model.value = record.model;
    if (!running) clearResult();
    if (!(await loadForm())) return;
  }
  form.clearErrors();
  const { fields, whole } = recalled(record, result, card.input_schema);
  form.fill(fields);
  updateCode();
  ui.formNote.textContent = whole
    ? `Loaded from request ${record.request_id}.`
    : `Loaded what is known of request ${record.request_id}: it was not sent from this browser, ` +
      "so only its model, and its seed and size while its result is kept (its prompt where kept).";
  ui.form.scrollIntoView({ block: "start" });
}

async function loadServerInfo() {
  const { response, body } = await getJson("/v1/server-info");
  if (!response.ok) return;
  ui.version.textContent = `qwenserve ${body.version} · weights: ${body.weights}`;
  if (body.random_weights) {
    ui.notice.textContent =
      body.weights === "tiny"
        ? "This server runs the tiny preset: small random weights, so every image is noise, by design. " +
          "Start it with --weights pointing at real weights for real images."
        : "This server runs random weights (a benchmark setting): every image is noise.";
    ui.notice.hidden = false;
  }
}

function fact(term, value, data = {}) {
  const dt = document.createElement("dt");
  dt.textContent = term;
  const dd = document.createElement("dd");
  dd.textContent = value;
  dd.dataset.fact = term.toLowerCase();
  Object.assign(dd.dataset, data);
  ui.facts.append(dt, dd);
}

async function showResult(id, key, startedAt) {
  const { response, body } = await getJson(`/v2/requests/${encodeURIComponent(id)}`, {
    headers: keyHeaders(key),
  });
  const source = response.ok ? imageSource(body) : null;
  if (!source) {
    setStatus("Failed", "", null, "failed");
    showBanner(`Could not read the result: ${body.error ?? response.status}`);
    return;
  }
  const seconds = (performance.now() - startedAt) / 1000;
  ui.facts.replaceChildren();
  const cost = body.metrics?.cost;
  if (typeof cost === "number") fact("Cost", money(cost), { usd: String(cost) });
  fact("Seed", String(body.seed));
  fact("Size", `${body.width} × ${body.height}`);
  const inference = body.metrics?.inference_time;
  fact("Time", `${inference !== undefined ? `${inference.toFixed(2)} s inference, ` : ""}${seconds.toFixed(1)} s in all`);
  fact("Request", id);
  const extension = (body.content_type ?? "image/png").split("/")[1] ?? "png";
  ui.download.href = source;
  ui.download.download = `qwenserve-${id}.${extension}`;
  ui.image.alt = `Generated by ${body.model}, seed ${body.seed}`;
  await new Promise((resolve) => {
    ui.image.addEventListener("load", resolve, { once: true });
    ui.image.addEventListener("error", resolve, { once: true });
    ui.image.src = source;
  });
  ui.result.hidden = false;
  setStatus("Completed", "", 1, "done");
}

/** A job that ended FAILED: its owner's cancel (refunded) is not shown as a failure. */
function showEnded(id, last) {
  if (last.status === "FAILED" && isCancelled(last.error)) {
    setStatus("Cancelled — refunded", "Nothing was charged: the price went back to the balance.", null, "cancelled");
    return;
  }
  setStatus(last.status === "GONE" ? "Expired" : "Failed", "", null, "failed");
  showBanner(`The request ${id} failed: ${last.error ?? "no reason given"}`);
}

function finish(key) {
  running = null;
  ui.submit.disabled = false;
  ui.cancel.hidden = true;
  // The charge, or its refund, is in the balance by now; the gallery gains the run.
  balance.refresh(key);
  gallery.refresh(key);
}

async function submit(event) {
  event.preventDefault();
  if (!form || running) return;
  showBanner("");
  ui.formNote.textContent = "";
  form.clearErrors();
  const key = currentKey();
  if (!key) {
    showBanner("Enter an API key first (qwenserve keys create).");
    ui.key.focus();
    return;
  }
  if (form.pending()) {
    showBanner("The image is still being read; try again in a moment.");
    return;
  }
  const slug = ui.form.dataset.slug;
  ui.submit.disabled = true;
  ui.result.hidden = true;
  setStatus("Submitting…");
  const startedAt = performance.now();
  const entries = form.entries();
  let answer;
  try {
    answer = await getJson(`/v2/${encodeURIComponent(slug)}`, {
      method: "POST",
      headers: { ...keyHeaders(key), "Content-Type": "application/json" },
      body: form.body(),
    });
  } catch (error) {
    setStatus("Not submitted.", "", null, "failed");
    showBanner(`The server could not be reached: ${error.message}`);
    ui.submit.disabled = false;
    return;
  }
  const { response, body } = answer;
  if (!response.ok) {
    setStatus("Not submitted.", "", null, "failed");
    const unplaced = response.status === 400 ? form.showErrors(body.errors ?? []) : [];
    if (response.status !== 400 || unplaced.length || !(body.errors ?? []).length) {
      showBanner(`${response.status}: ${unplaced.length ? unplaced.join(" ") : body.error}`);
    }
    if (response.status === 401) ui.key.focus();
    ui.submit.disabled = false;
    return;
  }
  const id = body.request_id;
  rememberRun(id, slug, entries);
  // Charged at submit: the header says the balance after it.
  const remaining = Number.parseFloat(response.headers.get("x-remaining-credits") ?? "");
  if (Number.isFinite(remaining)) balance.set(remaining);
  running = { id, abort: new AbortController() };
  ui.cancel.hidden = false;
  setStatus("Queued", "", 0);
  const last = await follow(id, key, showUpdate, running.abort.signal);
  if (last?.status === "COMPLETED") await showResult(id, key, startedAt);
  else if (last) showEnded(id, last);
  finish(key);
}

async function cancel() {
  if (!running) return;
  const { id } = running;
  const { response, body } = await getJson(`/v2/requests/${encodeURIComponent(id)}/cancel`, {
    method: "POST",
    headers: keyHeaders(currentKey()),
  });
  if (!response.ok && response.status !== 409) showBanner(`Cancel failed: ${body.error}`);
}

let keyTimer = null;
function keyChanged() {
  clearTimeout(keyTimer);
  keyTimer = setTimeout(() => {
    balance.refresh(currentKey());
    gallery.refresh(currentKey());
  }, KEY_SETTLE_MS);
}

ui.key.value = localStorage.getItem(KEY_STORAGE) ?? "";
ui.key.addEventListener("input", () => {
  localStorage.setItem(KEY_STORAGE, currentKey());
  keyChanged();
});
ui.forget.addEventListener("click", () => {
  localStorage.removeItem(KEY_STORAGE);
  ui.key.value = "";
  balance.clear();
  gallery.clear();
  ui.key.focus();
});
ui.model.addEventListener("change", () => {
  // The last run's result, status and errors were another model's: a new model starts blank.
  if (!running) clearResult();
  else showBanner("");
  loadForm();
});
ui.form.addEventListener("input", updateCode);
ui.form.addEventListener("change", updateCode);
ui.form.addEventListener("submit", submit);
$("setup-form").addEventListener("submit", (event) => event.preventDefault());
ui.cancel.addEventListener("click", cancel);
loadServerInfo();
loadModels();
balance.refresh(currentKey());
gallery.refresh(currentKey());
