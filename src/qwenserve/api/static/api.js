// What every part of the page shares: JSON calls to this server, and money as the page shows it.

/** fetch() then the JSON body (or {error} when the body is not JSON); never throws on a status. */
export async function getJson(url, options = {}) {
  const response = await fetch(url, { cache: "no-store", ...options });
  let body = null;
  try {
    body = await response.json();
  } catch {
    body = { error: `${response.status} ${response.statusText}` };
  }
  return { response, body };
}

/** The headers that authenticate a call with `key`. */
export const keyHeaders = (key) => ({ "x-api-key": key });

const USD = new Intl.NumberFormat("en-US", {
  style: "currency",
  currency: "USD",
  minimumFractionDigits: 2,
  maximumFractionDigits: 6, // the server rounds money to 6 digits: shown exactly
});

/** "$0.05", "$99.879": a USD amount as the page shows it. */
export const money = (usd) => USD.format(usd);

/** Whether a FAILED job's error says its owner cancelled it (the store words it so; refunded). */
export const isCancelled = (error) => typeof error === "string" && error.startsWith("cancelled");

/** A result body's image as an <img> source: its URL, or its base64 (when asked) as a data: URI. */
export function imageSource(body) {
  const output = body.output;
  if (typeof output !== "string") return null;
  if (/^(https?:|data:|\/)/.test(output)) return output;
  return `data:${body.content_type ?? "image/png"};base64,${output}`;
}
