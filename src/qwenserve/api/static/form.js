// A form built from a slug's input_schema (GET /v1/models/{slug}), and the JSON body read back.
// The server is the one judge of a body: the inputs carry min/max for the spinners and screen
// readers, but the form is `novalidate` and a 400's messages are shown next to their fields.
// Values travel as JSON text (name → text), so a typed 64-bit seed keeps every digit.

const INTEGER = /^-?(?:0|[1-9]\d*)$/;
const NUMBER = /^-?(?:0|[1-9]\d*)(?:\.\d+)?(?:[eE][+-]?\d+)?$/;

/** The property's JSON type, without the "null" that optional fields admit. */
function baseType(prop) {
  const types = Array.isArray(prop.type) ? prop.type : [prop.type];
  return types.find((t) => t !== "null") ?? "string";
}

function humanize(name) {
  const words = name.replace(/_/g, " ");
  return words.charAt(0).toUpperCase() + words.slice(1);
}

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs)) {
    if (value === undefined || value === null || value === false) continue;
    if (key === "text") node.textContent = value;
    else node.setAttribute(key, value === true ? "" : String(value));
  }
  node.append(...children.filter(Boolean));
  return node;
}

/** A bound safe to show and to use as an attribute (2**63-1 is not a safe JS number). */
function safeBound(value) {
  return typeof value === "number" && Number.isSafeInteger(Math.trunc(value)) ? value : undefined;
}

function rangeText(prop) {
  const min = safeBound(prop.minimum);
  const max = safeBound(prop.maximum);
  if (min !== undefined && max !== undefined) return `${min} to ${max}`;
  if (min !== undefined) return `${min} or more`;
  if (max !== undefined) return `up to ${max}`;
  return "";
}

function hintText(prop, required) {
  const parts = [baseType(prop)];
  const range = rangeText(prop);
  if (range) parts.push(range);
  if (prop.default !== undefined && prop.default !== null) parts.push(`default ${prop.default}`);
  parts.push(required ? "required" : "optional");
  return parts.join(" · ");
}

/** The JSON text `text` as a string value ("" when it is no JSON string). */
function textOf(text) {
  try {
    const value = JSON.parse(text);
    return typeof value === "string" ? value : value === null ? "" : String(value);
  } catch {
    return "";
  }
}

/**
 * One control for a property: {row, control, read, write}. read() gives [name, jsonText] or
 * null (not sent); write(jsonText) sets the control from such a text, write(undefined) resets it
 * to its default.
 */
function buildField(name, prop, required) {
  const id = `f-${name}`;
  const type = baseType(prop);
  const hintId = `${id}-hint`;
  const helpId = `${id}-help`;
  const errorId = `${id}-error`;
  const described = `${hintId} ${helpId} ${errorId}`;
  const row = el("div", { class: "field", "data-field": name });
  // A required field's star is drawn by CSS: its label (and name) stays the field's name alone.
  const label = el("label", { for: id, class: required ? "required" : undefined }, humanize(name));
  const hint = el("p", { id: hintId, class: "hint", text: hintText(prop, required) });
  const help = el("p", { id: helpId, class: "help", text: prop.description ?? "" });
  const error = el("p", { id: errorId, class: "field-error", "aria-live": "polite", hidden: true });
  const dflt = prop.default ?? undefined;
  const initial = dflt === undefined ? "" : String(dflt);
  let control;
  let read;
  let write;

  if (prop["x-qwenserve-image"]) {
    return buildImageField({ name, prop, required, id, row, label, hint, help, error, described });
  }
  if (prop.enum) {
    control = el("select", { id, name, "aria-describedby": described });
    if (!required && dflt === undefined) control.append(el("option", { value: "", text: "(server default)" }));
    for (const option of prop.enum.filter((v) => v !== null)) {
      control.append(el("option", { value: String(option), text: String(option) }));
    }
    read = () => (control.value === "" ? null : [name, JSON.stringify(control.value)]);
    write = (text) => {
      control.value = text === undefined ? initial : textOf(text);
    };
  } else if (type === "boolean") {
    control = el("input", { id, name, type: "checkbox", "aria-describedby": described });
    read = () => [name, control.checked ? "true" : "false"];
    write = (text) => {
      control.checked = text === undefined ? dflt === true : text === "true";
    };
    row.classList.add("checkbox");
  } else if (type === "integer" || type === "number") {
    control = el("input", {
      id,
      name,
      type: "number",
      inputmode: type === "integer" ? "numeric" : "decimal",
      step: type === "integer" ? "1" : "any",
      min: safeBound(prop.minimum),
      max: safeBound(prop.maximum),
      "aria-describedby": described,
      "aria-required": required ? "true" : undefined,
    });
    read = () => {
      const text = control.value.trim();
      if (text === "") return null;
      const pattern = type === "integer" ? INTEGER : NUMBER;
      // Digits go into the JSON as typed (a seed may exceed JS's safe integers); anything else
      // is sent as a string, so the server's message names the field.
      return [name, pattern.test(text) ? text : JSON.stringify(text)];
    };
    write = (text) => {
      if (text === undefined) control.value = initial;
      else control.value = text.startsWith('"') ? textOf(text) : text;
    };
  } else {
    const long = name.includes("prompt");
    control = el(long ? "textarea" : "input", {
      id,
      name,
      rows: long ? 3 : undefined,
      type: long ? undefined : "text",
      maxlength: prop.maxLength,
      "aria-describedby": described,
      "aria-required": required ? "true" : undefined,
    });
    read = () => (control.value === "" ? null : [name, JSON.stringify(control.value)]);
    write = (text) => {
      control.value = text === undefined ? initial : textOf(text);
    };
  }
  write(undefined);
  if (type === "boolean") row.append(control, label, hint, help, error);
  else row.append(label, control, hint, help, error);
  return { row, read, write, control };
}

function buildImageField({ name, prop, required, id, row, label, hint, help, error, described }) {
  // Two ways to give an image: a file (sent as a data: URI) or a URL / base64 typed in.
  row.classList.add("image-field");
  const urlId = `${id}-url`;
  const file = el("input", { id, name, type: "file", accept: "image/*", "aria-describedby": described });
  const urlLabel = el("label", { for: urlId, class: "sub", text: "…or an image URL" });
  const url = el("input", {
    id: urlId,
    type: "url",
    placeholder: "https://…",
    spellcheck: "false",
    "aria-describedby": described,
  });
  const preview = el("img", { class: "thumb", alt: `Selected ${humanize(name)}`, hidden: true });
  let dataUri = null;
  const clearFile = () => {
    file.value = "";
    dataUri = null;
    preview.hidden = true;
  };
  file.addEventListener("change", () => {
    const chosen = file.files && file.files[0];
    dataUri = null;
    preview.hidden = true;
    if (!chosen) return;
    const reader = new FileReader();
    reader.addEventListener("load", () => {
      dataUri = String(reader.result);
      preview.src = dataUri;
      preview.hidden = false;
      url.value = "";
    });
    reader.readAsDataURL(chosen);
  });
  url.addEventListener("input", () => {
    if (url.value.trim()) clearFile();
  });
  const read = () => {
    const typed = url.value.trim();
    if (typed) return [name, JSON.stringify(typed)];
    return dataUri ? [name, JSON.stringify(dataUri)] : null;
  };
  const pending = () => file.files && file.files.length > 0 && dataUri === null;
  // The file's name, for code that reads the same file from the user's disk.
  const fileName = () => (!url.value.trim() && file.files && file.files[0] ? file.files[0].name : null);
  const write = (text) => {
    // A file cannot be set from a script: a URL (or base64) is restored, an upload is not.
    clearFile();
    const value = text === undefined ? "" : textOf(text);
    url.value = value.startsWith("data:") ? "" : value;
  };
  row.append(label, file, urlLabel, url, preview, hint, help, error);
  return { row, read, write, control: file, pending, fileName, image: true };
}

/** Render `schema` into `container`; returns a form handle. */
export function buildForm(container, schema) {
  container.replaceChildren();
  const required = new Set(schema.required ?? []);
  const fields = new Map();
  const properties = schema.properties ?? {};
  // Required fields first (in the page's order), then the optional ones.
  const names = Object.keys(properties).sort(
    (a, b) => Number(required.has(b)) - Number(required.has(a)),
  );
  let optional = null;
  for (const name of names) {
    const field = buildField(name, properties[name], required.has(name));
    fields.set(name, field);
    if (required.has(name)) {
      container.append(field.row);
    } else {
      if (!optional) {
        optional = el("fieldset", { class: "optional" }, el("legend", { text: "Options" }));
        container.append(optional);
      }
      optional.append(field.row);
    }
  }
  return {
    /** True while an uploaded file is still being read. */
    pending: () => [...fields.values()].some((f) => f.pending && f.pending()),
    /**
     * What would be sent, in order: [{name, json, image, file}] (json the value's JSON text;
     * file the uploaded file's name for an image given as a file, else null).
     */
    entries() {
      const out = [];
      for (const field of fields.values()) {
        const pair = field.read();
        if (pair || (field.fileName && field.fileName())) {
          const file = field.fileName ? field.fileName() : null;
          out.push({ name: field.row.dataset.field, json: pair ? pair[1] : '""', image: !!field.image, file });
        }
      }
      return out;
    },
    /** The JSON body text: fields left empty are not sent (the server's default applies). */
    body() {
      const pairs = [];
      for (const field of fields.values()) {
        const pair = field.read();
        if (pair) pairs.push(`${JSON.stringify(pair[0])}:${pair[1]}`);
      }
      return `{${pairs.join(",")}}`;
    },
    /** Set every field from {name: jsonText}; a field not named goes back to its default. */
    fill(values) {
      for (const [name, field] of fields) field.write(values[name]);
    },
    clearErrors() {
      for (const [name, field] of fields) {
        const error = container.querySelector(`#f-${CSS.escape(name)}-error`);
        error.textContent = "";
        error.hidden = true;
        field.control.removeAttribute("aria-invalid");
        field.row.classList.remove("invalid");
      }
    },
    /** Show each {field, message} next to its field; returns the messages no field took. */
    showErrors(errors) {
      const unplaced = [];
      let first = null;
      for (const { field: name, message } of errors) {
        const field = fields.get(name);
        if (!field) {
          unplaced.push(message);
          continue;
        }
        const error = container.querySelector(`#f-${CSS.escape(name)}-error`);
        error.textContent = error.textContent ? `${error.textContent} ${message}` : message;
        error.hidden = false;
        field.control.setAttribute("aria-invalid", "true");
        field.row.classList.add("invalid");
        first = first ?? field.control;
      }
      if (first) first.focus();
      return unplaced;
    },
  };
}
