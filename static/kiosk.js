// The kiosk: full screen, hands-free, no controls. It starts by itself, listens all the time, shows
// large captions, goes back to an "attract" screen (and a fresh conversation) after a quiet spell,
// and reconnects with back-off whenever the connection or the server goes away.
//
// Query string: ?avatar=&persona=&voice= (names from /api/options), idle=SECONDS (attract after
// this much quiet, default 45), max_backoff=SECONDS (longest wait between reconnects, default 10).
import { FacecastClient, FacecastError, Reconnector, captionText, fetchOptions, forgetConversation } from "./facecast.js";

const MIC_CONSTRAINTS = {
  // Echo cancellation keeps the avatar from hearing (and interrupting) itself through the speakers.
  audio: { echoCancellation: true, noiseSuppression: true, autoGainControl: true },
  video: false,
};
const DISCONNECTED_GRACE_MS = 5000; // "disconnected" this long means the server is gone: start over
const CAPTION_MAX_CHARS = 160;
const CAPTION_LINGER_MS = 2500;

const params = new URLSearchParams(location.search);
const choices = {
  avatar: params.get("avatar") || undefined,
  persona: params.get("persona") || undefined,
  voice: params.get("voice") || undefined,
};
const idleMs = 1000 * Number(params.get("idle") || 45);
const maxBackoffMs = 1000 * Number(params.get("max_backoff") || 10);

const byTestId = (id) => document.querySelector(`[data-testid="${id}"]`);
const ui = {
  video: byTestId("avatar-video"),
  captions: byTestId("captions"),
  attract: byTestId("attract"),
  status: byTestId("status"),
  tap: byTestId("tap-to-start"),
};

let microphone = null;
let client = null;
let connects = 0;
let lastActivity = 0; // nothing said yet: the attract screen shows from the start
let conversed = false; // anything said since the last attract screen: then the next visitor gets a new session
let captionTimer = null;
let reply = { turn: null, text: "" };
let disconnectedTimer = null;

function setMode(mode) {
  document.body.dataset.kiosk = mode; // starting | live | reconnecting | blocked
}

function showStatus(html) {
  ui.status.innerHTML = html;
  ui.status.hidden = !html;
}

// --- captions and attract ------------------------------------------------------------

function showCaption(role, text) {
  clearTimeout(captionTimer);
  const shown = captionText(text, CAPTION_MAX_CHARS);
  if (!shown) return;
  ui.captions.textContent = shown;
  ui.captions.className = `captions ${role}`;
  ui.captions.hidden = false;
}

function hideCaption(afterMs = 0) {
  clearTimeout(captionTimer);
  captionTimer = setTimeout(() => (ui.captions.hidden = true), afterMs);
}

function activity() {
  lastActivity = Date.now();
  conversed = true;
  ui.attract.hidden = true;
}

function checkIdle() {
  if (!ui.attract.hidden || Date.now() - lastActivity < idleMs || client?.state === "speaking") return;
  ui.attract.hidden = false;
  hideCaption();
  if (conversed && client?.connected) {
    // The next visitor should not inherit this conversation: start a fresh session.
    conversed = false;
    forgetConversation();
    client.close("idle: fresh conversation for the next visitor");
  }
}

// --- the connection ---------------------------------------------------------------------

function onEvent(type, detail) {
  switch (type) {
    case "state":
      document.body.dataset.state = detail.state;
      if (detail.state === "thinking") activity();
      if (detail.state === "listening") hideCaption(CAPTION_LINGER_MS);
      break;
    case "transcript":
      activity();
      if (detail.text) showCaption("user", detail.text);
      break;
    case "reply":
      activity();
      if (reply.turn !== detail.turn) reply = { turn: detail.turn, text: "" };
      reply.text = detail.final ? detail.text : reply.text + detail.delta;
      if (client?.state === "speaking") showCaption("avatar", reply.text);
      break;
    case "metrics": // sent as the reply starts playing
      showCaption("avatar", reply.text);
      break;
    case "interrupted":
      hideCaption();
      break;
  }
}

function playVideo() {
  ui.video.play().then(
    () => (ui.tap.hidden = true),
    (error) => {
      // The browser wants a gesture before playing sound: one tap, then the kiosk runs by itself.
      if (error.name === "NotAllowedError") ui.tap.hidden = false;
    },
  );
}

function watchConnection(current, state) {
  clearTimeout(disconnectedTimer);
  if (state === "disconnected") {
    disconnectedTimer = setTimeout(() => current.close("the connection was lost"), DISCONNECTED_GRACE_MS);
  }
}

async function openMicrophone() {
  if (microphone) return microphone;
  if (!window.isSecureContext || !navigator.mediaDevices?.getUserMedia) {
    throw new FacecastError(
      "the microphone needs HTTPS (or localhost): serve Facecast over TLS, see the README's TLS section",
      { code: "insecure_context" },
    );
  }
  microphone = await navigator.mediaDevices.getUserMedia(MIC_CONSTRAINTS);
  return microphone;
}

async function connect() {
  setMode(connects ? "reconnecting" : "starting");
  const options = await fetchOptions();
  const stream = await openMicrophone();
  const current = new FacecastClient({ iceServers: options.ice_servers, iceTransportPolicy: options.ice_transport_policy });
  for (const type of ["state", "transcript", "reply", "metrics", "interrupted"]) {
    current.addEventListener(type, (event) => client === current && onEvent(type, event.detail));
  }
  current.addEventListener("media", (event) => {
    if (ui.video.srcObject !== event.detail.stream) ui.video.srcObject = event.detail.stream;
    playVideo();
  });
  current.addEventListener("connection", (event) => watchConnection(current, event.detail.state));
  current.addEventListener("closed", () => {
    if (client !== current) return;
    client = null;
    clearTimeout(disconnectedTimer);
    document.body.dataset.state = "offline";
    setMode("reconnecting");
    reconnector.retry();
  });
  client = current;
  try {
    await current.connect({ microphone: stream, ...choices });
  } catch (error) {
    if (client === current) client = null;
    throw error;
  }
  connects += 1;
  reply = { turn: null, text: "" };
  showStatus("");
  setMode("live");
}

function describe(error) {
  if (error?.name === "NotAllowedError") {
    return "<p><strong>The microphone is blocked.</strong></p><p>Allow it for this page in the browser's site settings.</p>";
  }
  const message = error instanceof FacecastError ? error.message : `${error?.name ?? "Error"}: ${error?.message ?? error}`;
  return `<p><strong>Reconnecting…</strong></p><p>${message.replace(/</g, "&lt;")}</p>`;
}

const reconnector = new Reconnector(connect, {
  maxDelayMs: maxBackoffMs,
  onWait: ({ error, waitMs }) => {
    if (error) showStatus(`${describe(error)}<p>Next try in ${Math.ceil(waitMs / 1000)} s.</p>`);
  },
});

function onTap() {
  playVideo();
  document.documentElement.requestFullscreen?.().catch(() => {});
}

function init() {
  ui.tap.addEventListener("click", onTap);
  ui.tap.addEventListener("keydown", (event) => event.key === "Enter" && onTap());
  setInterval(checkIdle, 1000);
  window.addEventListener("pagehide", () => client?.close("page closed"));
  // For tests and debugging.
  window.facecastKiosk = {
    get client() {
      return client;
    },
    get connects() {
      return connects;
    },
  };
  reconnector.start();
}

init();
