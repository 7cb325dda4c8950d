// "Copy as code": the form as it stands, as a curl command (v1: submit and wait), a segmind SDK
// call (v2: submit and poll) and an openai SDK call (/v1/images/*). Each runs as shown against
// this server, with the key read from SEGMIND_API_KEY (never written into the code); fields left
// empty are left out, so the server's defaults apply alike. An image given as a file is read from
// the user's disk by its name; one given as a URL or base64 is passed as typed.
//
// Every builder takes {origin, slug, kind, schema, entries}: entries as form.entries() gives them
// ({name, json, image, file}: json the value's JSON text, file an uploaded file's name or null).

const KEY_LINE = "export SEGMIND_API_KEY=<your key>";
const PY_WORDS = new Map([
  ["true", "True"],
  ["false", "False"],
  ["null", "None"],
]);

// A parameter name usable as a Python keyword argument (else it goes in as **{"name": value}).
const PY_KEYWORDS = new Set(
  ("False None True and as assert async await break class continue def del elif else except " +
    "finally for from global if import in is lambda nonlocal not or pass raise return try while " +
    "with yield").split(" "),
);
const isIdentifier = (name) => /^[A-Za-z_]\w*$/.test(name) && !PY_KEYWORDS.has(name);

/** A shell word that is exactly `text` (single quotes; a quote inside closed and escaped). */
export const shellWord = (text) => `'${text.replace(/'/g, `'\\''`)}'`;

/** A Python literal from a scalar's JSON text (a JSON string is a valid Python str literal). */
const pyValue = (json) => PY_WORDS.get(json) ?? json;

const isTrue = (entries, names) => entries.some((e) => names.includes(e.name) && e.json === "true");

function outputFormat({ entries, schema }) {
  const chosen = entries.find((e) => e.name === "image_format");
  if (chosen) return JSON.parse(chosen.json);
  return schema.properties?.image_format?.default ?? "png";
}

// --- curl --------------------------------------------------------------------------------------

/** JSON text of the body, one field a line; files as {file} parts for the shell to fill in. */
function bodyParts(entries) {
  const parts = [];
  let text = "{";
  entries.forEach((entry, index) => {
    text += `${index ? "," : ""}\n  ${JSON.stringify(entry.name)}: `;
    if (entry.file) {
      parts.push({ text: `${text}"` }, { file: entry.file });
      text = '"';
    } else {
      text += entry.json;
    }
  });
  parts.push({ text: `${text}\n}` });
  return parts;
}

export function curlCode(context) {
  const { origin, slug, entries } = context;
  const request = [
    `curl -sS -X POST ${shellWord(`${origin}/v1/${slug}`)}`,
    `-H "x-api-key: $SEGMIND_API_KEY"`,
    `-H "Content-Type: application/json"`,
  ];
  // v1 answers the image itself, or JSON with base64 when asked for.
  const save = isTrue(entries, ["base64", "base_64"]) ? [] : [`-o output.${outputFormat(context)}`];
  const parts = bodyParts(entries);
  if (parts.length === 1) {
    return [`# ${KEY_LINE}`, [...request, `-d ${shellWord(parts[0].text)}`, ...save].join(" \\\n  ")].join("\n");
  }
  // A file goes in base64-encoded, the body piped in: no limit on an argument's size applies.
  const writers = parts.map((part) =>
    part.file ? `base64 < ${shellWord(part.file)} | tr -d '\\n'` : `printf '%s' ${shellWord(part.text)}`,
  );
  const pipe = `{\n  ${writers.join("\n  ")}\n} | ${[...request, "--data-binary @-", ...save].join(" \\\n  ")}`;
  return [`# ${KEY_LINE}`, `# run in the folder that holds ${uploadNames(entries)}`, pipe].join("\n");
}

const uploadNames = (entries) => entries.filter((e) => e.file).map((e) => e.file).join(", ");

// --- Python ------------------------------------------------------------------------------------

function pyCall(head, args) {
  return `${head}(\n${args.map((arg) => `    ${arg},\n`).join("")})`;
}

function imports(names) {
  return names.map((name) => `import ${name}`).join("\n");
}

export function segmindCode(context) {
  const { origin, slug, entries } = context;
  const files = entries.some((e) => e.file);
  const args = [JSON.stringify(slug)];
  for (const entry of entries) {
    const value = entry.file
      ? `base64.b64encode(open(${JSON.stringify(entry.file)}, "rb").read()).decode()`
      : pyValue(entry.json);
    args.push(isIdentifier(entry.name) ? `${entry.name}=${value}` : `**{${JSON.stringify(entry.name)}: ${value}}`);
  }
  return [
    `# pip install segmind; ${KEY_LINE}`,
    ...(files ? [imports(["base64"]), ""] : []),
    "from segmind import SegmindClient",
    "",
    `client = SegmindClient(base_url=${JSON.stringify(`${origin}/v1`)})  # the key from SEGMIND_API_KEY`,
    `result = ${pyCall("client.run", args)}  # v2: submit, then poll until it ends`,
    'print(result["status"], result["metrics"]["cost"], result["output"])',
  ].join("\n");
}

/** An image for the openai SDK's multipart upload: the file itself, or the URL's bytes. */
function openaiImage(entry, needs) {
  if (entry.file) return `open(${JSON.stringify(entry.file)}, "rb")`;
  const source = JSON.parse(entry.json).trim();
  const name = JSON.stringify(`${entry.name}.png`);
  if (/^(https?|data):/i.test(source)) {
    needs.add("urllib.request");
    return `(${name}, urllib.request.urlopen(${JSON.stringify(source)}).read())`;
  }
  return `(${name}, base64.b64decode(${JSON.stringify(source)}))`; // base64 typed in
}

/** The openai SDK's arguments for the form's Segmind fields (api/openai_request.py's mapping). */
function openaiArgs(context, needs) {
  const { slug, entries, schema } = context;
  const byName = new Map(entries.map((e) => [e.name, e]));
  const images = entries.filter((e) => e.image);
  const args = [`model=${JSON.stringify(slug)}`];
  const extra = [];
  const props = schema.properties ?? {};
  const integer = (name) => /^\d+$/.test(byName.get(name)?.json ?? "");
  const size = "width" in props && "height" in props && integer("width") && integer("height");
  if (images.length === 1) args.push(`image=${openaiImage(images[0], needs)}`);
  else if (images.length > 1) args.push(`image=[${images.map((e) => openaiImage(e, needs)).join(", ")}]`);
  else if (context.kind === "edit") args.push("image=[]"); // none chosen yet: the server says so
  for (const entry of entries) {
    if (entry.image || ["base64", "base_64"].includes(entry.name)) continue; // response_format says
    if (size && (entry.name === "width" || entry.name === "height")) continue;
    if (entry.name === "prompt") args.push(`prompt=${pyValue(entry.json)}`);
    else if (entry.name === "image_format") args.push(`output_format=${pyValue(entry.json)}`);
    else if (entry.name === "quality" && integer("quality")) args.push(`output_compression=${entry.json}`);
    else extra.push(`${JSON.stringify(entry.name)}: ${pyValue(entry.json)}`);
  }
  if (size) args.push(`size="${byName.get("width").json}x${byName.get("height").json}"`);
  args.push('response_format="b64_json"');
  if (extra.length) args.push(`extra_body={${extra.join(", ")}}`); // the slug's own parameters
  return { args, edit: images.length > 0 || context.kind === "edit" };
}

export function openaiCode(context) {
  const needs = new Set(["base64", "os"]);
  const { args, edit } = openaiArgs(context, needs);
  const method = edit ? "client.images.edit" : "client.images.generate";
  return [
    `# pip install openai; ${KEY_LINE}`,
    imports([...needs].sort()),
    "",
    "from openai import OpenAI",
    "",
    `client = OpenAI(base_url=${JSON.stringify(`${context.origin}/v1`)}, api_key=os.environ["SEGMIND_API_KEY"])`,
    `result = ${pyCall(method, args)}`,
    `with open("output.${outputFormat(context)}", "wb") as out:`,
    "    out.write(base64.b64decode(result.data[0].b64_json))",
  ].join("\n");
}

export const BUILDERS = { curl: curlCode, segmind: segmindCode, openai: openaiCode };
