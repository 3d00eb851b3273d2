// Talks to the public API with the signed-in read key (kept in sessionStorage), and nothing else.

const STORAGE = "meterline.readKey";

/** The API refused the key (401) or the key may not read (403): back to sign-in. */
export class AuthError extends Error {
  constructor(status, message) {
    super(message);
    this.status = status;
  }
}

/** Any other failure, with the API's error code and message when it gave them. */
export class ApiError extends Error {
  constructor(status, code, message) {
    super(message);
    this.status = status;
    this.code = code;
  }
}

export function key() {
  return sessionStorage.getItem(STORAGE);
}

export function signIn(k) {
  sessionStorage.setItem(STORAGE, k);
}

export function signOut() {
  sessionStorage.removeItem(STORAGE);
}

/** The query string for `params`, dropping empty values. */
export function query(params) {
  const q = new URLSearchParams();
  for (const [k, v] of Object.entries(params)) {
    if (v !== undefined && v !== null && v !== "") q.set(k, v);
  }
  const s = q.toString();
  return s ? "?" + s : "";
}

/** GETs an API path as JSON; throws AuthError on 401/403 and ApiError otherwise. */
export async function get(path, params = {}, { allow = [] } = {}) {
  let response;
  try {
    response = await fetch(path + query(params), { headers: { Authorization: "Bearer " + key(), Accept: "application/json" } });
  } catch (e) {
    throw new ApiError(0, "network", "The server could not be reached: " + e.message);
  }
  let body = null;
  try {
    body = await response.json();
  } catch {
    // Not JSON: the status alone speaks.
  }
  if (response.ok || allow.includes(response.status)) return { status: response.status, body };
  const err = body && body.error ? body.error : {};
  if (response.status === 401 || (response.status === 403 && !allow.includes(403))) {
    throw new AuthError(response.status, err.message || "the key was refused");
  }
  throw new ApiError(response.status, err.code || "http_" + response.status, err.message || response.statusText);
}

/** Checks a key before keeping it: a cheap read it must be allowed to make. */
export async function check(k) {
  const response = await fetch("/v1/alerts?limit=1", { headers: { Authorization: "Bearer " + k } });
  if (response.ok) return null;
  let message = "";
  try {
    message = (await response.json()).error.message;
  } catch {
    message = response.statusText;
  }
  if (response.status === 401) return "That key was not accepted: it is wrong, revoked or expired.";
  if (response.status === 403) return "That key cannot read usage (" + message + "): sign in with a read key.";
  return "The server answered " + response.status + ": " + message;
}
