// The playground's wiring: key, model picker, submit (POST /v2/{slug}), live status, result.
import { buildForm } from "./form.js";
import { follow } from "./follow.js";

const KEY_STORAGE = "qwenserve.apiKey";
const MODEL_STORAGE = "qwenserve.model";

const $ = (id) => document.getElementById(id);
const ui = {
  key: $("api-key"),
  forget: $("forget-key"),
  model: $("model"),
  modelHelp: $("model-help"),
  form: $("run-form"),
  fields: $("fields"),
  submit: $("submit"),
  cancel: $("cancel"),
  banner: $("banner"),
  notice: $("notice"),
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
let running = null; // {id, abort: AbortController}

function showBanner(message) {
  ui.banner.textContent = message;
  ui.banner.hidden = !message;
}

async function getJson(url, options = {}) {
  const response = await fetch(url, { cache: "no-store", ...options });
  let body = null;
  try {
    body = await response.json();
  } catch {
    body = { error: `${response.status} ${response.statusText}` };
  }
  return { response, body };
}

function setStatus(text, detail = "", fraction = null) {
  ui.statusText.textContent = text;
  ui.statusDetail.textContent = detail;
  ui.progress.hidden = fraction === null;
  if (fraction !== null) ui.progress.value = fraction;
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

async function loadForm() {
  const slug = ui.model.value;
  if (!slug) return;
  localStorage.setItem(MODEL_STORAGE, slug);
  const chosen = ui.model.selectedOptions[0];
  ui.modelHelp.textContent = `${chosen.dataset.description} $${chosen.dataset.price} per run.`;
  ui.fields.setAttribute("aria-busy", "true");
  const { response, body } = await getJson(`/v1/models/${encodeURIComponent(slug)}`);
  ui.fields.removeAttribute("aria-busy");
  if (!response.ok) {
    showBanner(`Could not load ${slug}: ${body.error ?? response.status}`);
    return;
  }
  if (ui.model.value !== slug) return; // another model was picked meanwhile
  form = buildForm(ui.fields, body.input_schema);
  ui.form.dataset.slug = slug;
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

function fact(term, value) {
  const dt = document.createElement("dt");
  dt.textContent = term;
  const dd = document.createElement("dd");
  dd.textContent = value;
  dd.dataset.fact = term.toLowerCase();
  ui.facts.append(dt, dd);
}

function imageSource(body) {
  const output = body.output;
  if (typeof output !== "string") return null;
  if (/^(https?:|data:|\/)/.test(output)) return output;
  return `data:${body.content_type ?? "image/png"};base64,${output}`; // base64 asked for
}

async function showResult(id, key, startedAt) {
  const { response, body } = await getJson(`/v2/requests/${encodeURIComponent(id)}`, {
    headers: { "x-api-key": key },
  });
  const source = response.ok ? imageSource(body) : null;
  if (!source) {
    setStatus("Failed", "");
    showBanner(`Could not read the result: ${body.error ?? response.status}`);
    return;
  }
  const seconds = (performance.now() - startedAt) / 1000;
  ui.facts.replaceChildren();
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
  setStatus("Completed", "", 1);
}

function finish() {
  running = null;
  ui.submit.disabled = false;
  ui.cancel.hidden = true;
}

async function submit(event) {
  event.preventDefault();
  if (!form || running) return;
  showBanner("");
  form.clearErrors();
  const key = ui.key.value.trim();
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
  let answer;
  try {
    answer = await getJson(`/v2/${encodeURIComponent(slug)}`, {
      method: "POST",
      headers: { "x-api-key": key, "Content-Type": "application/json" },
      body: form.body(),
    });
  } catch (error) {
    setStatus("Not submitted.");
    showBanner(`The server could not be reached: ${error.message}`);
    ui.submit.disabled = false;
    return;
  }
  const { response, body } = answer;
  if (!response.ok) {
    setStatus("Not submitted.");
    const unplaced = response.status === 400 ? form.showErrors(body.errors ?? []) : [];
    if (response.status !== 400 || unplaced.length || !(body.errors ?? []).length) {
      showBanner(`${response.status}: ${unplaced.length ? unplaced.join(" ") : body.error}`);
    }
    if (response.status === 401) ui.key.focus();
    ui.submit.disabled = false;
    return;
  }
  const id = body.request_id;
  running = { id, abort: new AbortController() };
  ui.cancel.hidden = false;
  setStatus("Queued", "", 0);
  const last = await follow(id, key, showUpdate, running.abort.signal);
  if (last?.status === "COMPLETED") {
    await showResult(id, key, startedAt);
  } else if (last) {
    setStatus(last.status === "GONE" ? "Expired" : "Failed", "");
    showBanner(`The request ${id} failed: ${last.error ?? "no reason given"}`);
  }
  finish();
}

async function cancel() {
  if (!running) return;
  const { id } = running;
  const { response, body } = await getJson(`/v2/requests/${encodeURIComponent(id)}/cancel`, {
    method: "POST",
    headers: { "x-api-key": ui.key.value.trim() },
  });
  if (!response.ok && response.status !== 409) showBanner(`Cancel failed: ${body.error}`);
}

ui.key.value = localStorage.getItem(KEY_STORAGE) ?? "";
ui.key.addEventListener("input", () => localStorage.setItem(KEY_STORAGE, ui.key.value.trim()));
ui.forget.addEventListener("click", () => {
  localStorage.removeItem(KEY_STORAGE);
  ui.key.value = "";
  ui.key.focus();
});
ui.model.addEventListener("change", () => {
  showBanner("");
  loadForm();
});
ui.form.addEventListener("submit", submit);
$("setup-form").addEventListener("submit", (event) => event.preventDefault());
ui.cancel.addEventListener("click", cancel);
loadServerInfo();
loadModels();
