// A receive-only view of a broadcast session for an OBS Browser Source: the avatar alone, no UI.
//
// Query string:
//   session=ID          the broadcast session to watch (default: the server's default broadcast)
//   bg=avatar           the avatar's own picture (default); bg=green: chroma green #00ff00;
//   bg=transparent      transparent (OBS composites the page's alpha)
//   captions=1          the avatar's words over the picture
//
// A photo has no green screen to key, so for green and transparent the server cuts the person out of
// the avatar once (GET /api/avatars/{name}/mask.png, see media_server/media/segmentation.py) and this page
// applies that mask to every video frame on a canvas. The server's default broadcast starts by itself for
// this page. The page reconnects by itself, with back-off, when the broadcast is not there, has ended, or
// the server restarts, and says why in words meanwhile.
import { FacecastClient, Reconnector, fetchOptions } from "./facecast.js";

const BACKGROUNDS = ["avatar", "green", "transparent"];
const CAPTION_LINGER_MS = 1500;

const params = new URLSearchParams(location.search);
const sessionId = params.get("session") || "";
const background = BACKGROUNDS.includes(params.get("bg")) ? params.get("bg") : "avatar";
const captionsOn = params.get("captions") === "1";

const video = document.querySelector('[data-testid="avatar-video"]');
const canvas = document.querySelector('[data-testid="avatar-canvas"]');
const captions = document.querySelector('[data-testid="captions"]');
const status = document.querySelector('[data-testid="status"]');
const context = canvas.getContext("2d");

let client = null;
let mask = null; // the avatar's cut-out (an Image), for green and transparent backgrounds
let reply = { turn: null, text: "" };
let captionTimer = null;

// --- drawing -----------------------------------------------------------------------------

function draw() {
  if (client?.connected && video.videoWidth && (background === "avatar" || mask)) {
    if (canvas.width !== video.videoWidth || canvas.height !== video.videoHeight) {
      canvas.width = video.videoWidth;
      canvas.height = video.videoHeight;
    }
    context.globalCompositeOperation = "copy";
    context.drawImage(video, 0, 0);
    if (background !== "avatar") {
      // Keep the video only where the mask is opaque: the person, with soft edges.
      context.globalCompositeOperation = "destination-in";
      context.drawImage(mask, 0, 0, canvas.width, canvas.height);
    }
  }
  requestAnimationFrame(draw);
}

async function loadMask(avatar) {
  if (background === "avatar") return;
  const image = new Image();
  image.src = `/api/avatars/${encodeURIComponent(avatar)}/mask.png`;
  await image.decode();
  mask = image;
}

// --- captions ------------------------------------------------------------------------------

function showCaption(text) {
  if (!captionsOn || !text) return;
  clearTimeout(captionTimer);
  captions.textContent = text;
  captions.hidden = false;
}

function onReply(event) {
  if (reply.turn !== event.turn) reply = { turn: event.turn, text: "" };
  reply.text = event.final ? event.text : reply.text + event.delta;
  if (client?.state === "speaking") showCaption(reply.text);
}

function onState(state) {
  document.body.dataset.state = state;
  if (state === "speaking") showCaption(reply.text);
  if (state === "listening") {
    clearTimeout(captionTimer);
    captionTimer = setTimeout(() => (captions.hidden = true), CAPTION_LINGER_MS);
  }
}

// --- the connection ----------------------------------------------------------------------------

function showStatus(text) {
  status.textContent = text;
  status.hidden = !text;
}

function play() {
  video.muted = false;
  video.play().catch((error) => {
    // No gesture ever comes to an OBS source: if sound is refused, show the picture silently.
    if (error.name === "NotAllowedError") {
      video.muted = true;
      video.play().catch(() => {});
    }
  });
}

async function connect() {
  document.body.dataset.obs = "connecting";
  const options = await fetchOptions();
  const current = new FacecastClient({ iceServers: options.ice_servers, iceTransportPolicy: options.ice_transport_policy });
  current.addEventListener("session", (event) => loadMask(event.detail.avatar).catch(() => {}));
  current.addEventListener("state", (event) => onState(event.detail.state));
  current.addEventListener("reply", (event) => onReply(event.detail));
  current.addEventListener("media", (event) => {
    if (video.srcObject !== event.detail.stream) video.srcObject = event.detail.stream;
    play();
  });
  current.addEventListener("closed", () => {
    if (client !== current) return;
    client = null;
    // Nothing but the background until the avatar is back (not its last frame, frozen).
    context.clearRect(0, 0, canvas.width, canvas.height);
    document.body.dataset.obs = "reconnecting";
    reconnector.retry();
  });
  client = current;
  try {
    await current.watch(sessionId);
  } catch (error) {
    if (client === current) client = null;
    throw error;
  }
  document.body.dataset.obs = "live";
  showStatus("");
}

const reconnector = new Reconnector(connect, {
  maxDelayMs: 10000,
  onWait: ({ error, waitMs }) => {
    if (!error) return;
    console.warn(`Facecast: ${error.message}; retrying`);
    showStatus(`The avatar cannot be shown: ${error.message}. Trying again in ${Math.ceil(waitMs / 1000)} s.`);
  },
});

document.body.dataset.bg = background;
window.addEventListener("pagehide", () => client?.close("page closed"));
document.addEventListener("click", play); // in a normal browser, a click brings the sound back if it was refused
window.facecastObs = {
  get client() {
    return client;
  },
};
requestAnimationFrame(draw);
reconnector.start();
