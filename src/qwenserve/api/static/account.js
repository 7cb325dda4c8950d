// The key's money and history: its balance (GET /v1/get-user-credits) and a gallery of its recent
// requests (GET /v2/requests, newest first), each of which reloads its parameters into the form.
// History keeps a request's model (its prompt only where the server keeps prompts), so the page
// also keeps what it sent itself (localStorage; files left out: they are the user's, and large);
// a result still held gives the seed used, so a random seed's image can be made again.
import { getJson, imageSource, isCancelled, keyHeaders, money } from "./api.js";

const RUNS_STORAGE = "qwenserve.runs";
const MAX_REMEMBERED = 50;
const GALLERY_SIZE = 12;

/** The balance line: set from a header, or refreshed from the API. */
export function balanceView(node) {
  let asked = 0; // answers may come back out of order: only the latest question's is shown
  const set = (usd) => {
    node.dataset.usd = String(usd);
    node.textContent = `Balance: ${money(usd)}`;
    node.hidden = false;
  };
  return {
    set,
    clear() {
      asked += 1;
      node.hidden = true;
      delete node.dataset.usd;
    },
    async refresh(key) {
      const ticket = ++asked;
      if (!key) return this.clear();
      const { response, body } = await getJson("/v1/get-user-credits", { headers: keyHeaders(key) });
      if (ticket !== asked) return;
      if (response.ok) set(body.credits);
      else {
        delete node.dataset.usd;
        node.textContent = response.status === 401 ? "Balance: unknown key" : "Balance: unavailable";
        node.hidden = false;
      }
    },
  };
}

function remembered() {
  try {
    return JSON.parse(localStorage.getItem(RUNS_STORAGE) ?? "{}") ?? {};
  } catch {
    return {};
  }
}

/** Keep what request `id` sent ({name: jsonText}, files and data: URIs left out). */
export function rememberRun(id, slug, entries) {
  const fields = {};
  for (const entry of entries) {
    if (entry.file || (entry.image && entry.json.startsWith('"data:'))) continue;
    fields[entry.name] = entry.json;
  }
  const runs = remembered();
  runs[id] = { slug, fields, at: Date.now() };
  const ids = Object.keys(runs).sort((a, b) => runs[b].at - runs[a].at);
  for (const old of ids.slice(MAX_REMEMBERED)) delete runs[old];
  try {
    localStorage.setItem(RUNS_STORAGE, JSON.stringify(runs));
  } catch {
    // Storage full or off: the gallery falls back to the history's prompt.
  }
}

/**
 * The form values ({name: jsonText}) that remake `record`, given its result body (or null);
 * `whole` is false where only history's and the result's part is known (not sent from here).
 */
export function recalled(record, result, schema) {
  const props = schema.properties ?? {};
  const saved = remembered()[record.request_id];
  const fields = saved ? { ...saved.fields } : {};
  // A prompt not kept stays blank (not the form's default): the user writes it again.
  if (!saved) fields.prompt = JSON.stringify(record.prompt ?? "");
  const seed = result?.seed;
  const random = fields.seed === undefined || fields.seed === "-1" || fields.seed === "null";
  if ("seed" in props && Number.isSafeInteger(seed) && random) fields.seed = String(seed);
  if (!saved && result?.width && "width" in props && "height" in props) {
    fields.width = String(result.width);
    fields.height = String(result.height);
  }
  return { fields, whole: saved !== undefined };
}

/** The prompt a tile shows: history's, else the one this browser sent. */
function promptOf(record, runs) {
  if (record.prompt != null) return record.prompt;
  const sent = runs[record.request_id]?.fields.prompt;
  return sent === undefined ? "" : JSON.parse(sent);
}

/** What a request's state is called on its tile. */
export function stateName(record) {
  if (record.status === "FAILED") return isCancelled(record.error) ? "Cancelled — refunded" : "Failed";
  if (record.status === "COMPLETED") return "Completed";
  return record.status === "QUEUED" ? "Queued" : "Running";
}

function tile(record, prompt, key, onPick) {
  const button = document.createElement("button");
  button.type = "button";
  button.className = "tile";
  button.dataset.requestId = record.request_id;
  button.dataset.status = record.status;
  button.setAttribute("aria-label", `Load the parameters of ${record.model}: ${prompt}`);
  button.title = `${record.request_id} · ${new Date(record.created_at * 1000).toLocaleString()}`;
  const picture = document.createElement("div");
  picture.className = "tile-image";
  const state = stateName(record);
  picture.textContent = record.status === "COMPLETED" ? "" : state;
  const facts = document.createElement("span");
  facts.className = "tile-facts";
  const model = document.createElement("span");
  model.className = "tile-model";
  model.textContent = record.model;
  const cost = document.createElement("span");
  cost.className = "tile-cost";
  cost.dataset.usd = String(record.cost);
  cost.textContent = money(record.cost);
  const text = document.createElement("span");
  text.className = "tile-prompt";
  text.textContent = prompt;
  facts.append(model, cost);
  button.append(picture, facts, text);
  let result = null;
  if (record.status === "COMPLETED") {
    // The image, while the result is held (history outlives it).
    getJson(`/v2/requests/${encodeURIComponent(record.request_id)}`, { headers: keyHeaders(key) }).then(
      ({ response, body }) => {
        const source = response.ok ? imageSource(body) : null;
        if (!source) {
          picture.textContent = "expired";
          return;
        }
        result = body;
        const image = document.createElement("img");
        image.alt = "";
        image.src = source;
        picture.append(image);
      },
    );
  }
  button.addEventListener("click", () => onPick(record, result));
  const item = document.createElement("li");
  item.append(button);
  return item;
}

/** The gallery of the key's recent requests; onPick(record, resultOrNull) on a click. */
export function galleryView(list, empty, onPick) {
  let asked = 0;
  return {
    clear() {
      asked += 1;
      list.replaceChildren();
      empty.textContent = "Enter your API key to see its recent generations.";
      empty.hidden = false;
    },
    async refresh(key) {
      const ticket = ++asked;
      if (!key) return this.clear();
      const { response, body } = await getJson(`/v2/requests?limit=${GALLERY_SIZE}`, {
        headers: keyHeaders(key),
      });
      if (ticket !== asked) return;
      if (!response.ok) {
        list.replaceChildren();
        empty.textContent = `Could not read the history: ${body.error ?? response.status}`;
        empty.hidden = false;
        return;
      }
      const runs = remembered();
      const tiles = body.data.map((record) => tile(record, promptOf(record, runs), key, onPick));
      list.replaceChildren(...tiles);
      empty.textContent = "Nothing generated with this key yet.";
      empty.hidden = body.data.length > 0;
    },
  };
}
