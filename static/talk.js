// The talk page: one conversation with the avatar, by voice or by typing.
import { FacecastClient, FacecastError, captionText, fetchOptions } from "./facecast.js";

const MIC_CONSTRAINTS = {
  audio: { echoCancellation: true, noiseSuppression: true, autoGainControl: true },
  video: false,
};
const STATE_LABELS = {
  offline: "Offline",
  connecting: "Connecting…",
  listening: "Listening",
  thinking: "Thinking",
  speaking: "Speaking",
};
// metrics.latency_ms keys, in pipeline order, with how the page names them.
const STAGES = [
  ["transcript", "speech-to-text"],
  ["first_token", "first word"],
  ["first_tts_audio", "voice"],
  ["first_lipsync_frame", "face"],
];
const INTERRUPT_REASONS = {
  client: "You interrupted the avatar",
  "barge-in": "You spoke over the avatar",
  "new message": "Interrupted by your new message",
};
const CAPTION_MAX_CHARS = 180;
const CAPTION_LINGER_MS = 1500;
// What a knowledge base takes (the server checks again, and says why it refuses a file).
const DOCUMENT_TYPES = [".pdf", ".md", ".markdown", ".txt", ".text", ".html", ".htm"];
const TOKEN_KEY = "facecast-api-token";

const byTestId = (id) => document.querySelector(`[data-testid="${id}"]`);
const ui = {
  state: byTestId("state"),
  notice: byTestId("notice"),
  error: byTestId("error"),
  video: byTestId("avatar-video"),
  captions: byTestId("captions"),
  playOverlay: byTestId("play-overlay"),
  talk: byTestId("talk-button"),
  mute: byTestId("mute-button"),
  interrupt: byTestId("interrupt-button"),
  end: byTestId("end-button"),
  meter: byTestId("mic-meter"),
  avatar: byTestId("avatar-select"),
  voice: byTestId("voice-select"),
  persona: byTestId("persona-select"),
  pickerHint: byTestId("picker-hint"),
  chat: byTestId("chat"),
  composer: byTestId("composer"),
  input: byTestId("text-input"),
  send: byTestId("send-button"),
  chatPanel: byTestId("chat-panel"),
  dropHint: byTestId("drop-hint"),
  upload: byTestId("upload-button"),
  uploadInput: byTestId("upload-input"),
};
ui.screen = ui.video.parentElement;

let options = { avatars: [], personas: {}, voices: [], defaults: {}, ice_servers: [] };
let optionsLoaded = Promise.resolve(); // settles once `options` is loaded (or could not be)
/** The current connection: {client, microphone, meter, ready, connected, muted, persona}, or null. */
let session = null;

// --- banners -----------------------------------------------------------------

function showBanner(banner, html) {
  banner.querySelector(".banner-body").innerHTML = html;
  banner.hidden = false;
}

function escapeHtml(text) {
  const span = document.createElement("span");
  span.textContent = text;
  return span.innerHTML;
}

function showError(message) {
  showBanner(ui.error, `<p>${escapeHtml(message)}</p>`);
}

function hideError() {
  ui.error.hidden = true;
}

function describeError(error) {
  if (!(error instanceof FacecastError)) return `Something went wrong: ${error.message}`;
  if (error.status === 503 && error.retryAfterS) return `The server is busy: ${error.message} (in ${error.retryAfterS} s).`;
  if (error.status) return `The server refused (${error.status} ${error.code}): ${error.message}`;
  return capitalized(error.message);
}

function capitalized(text) {
  return text.charAt(0).toUpperCase() + text.slice(1);
}

function showInsecureContextNotice() {
  const origin = escapeHtml(location.origin);
  const localUrl = escapeHtml(`http://localhost${location.port ? `:${location.port}` : ""}/`);
  showBanner(
    ui.notice,
    `<p><strong>The microphone can't be used on this address.</strong> Browsers only allow the microphone on
     <code>localhost</code> or over HTTPS, and this page was opened over plain HTTP at <code>${origin}</code>.</p>
     <p>Open <code>${localUrl}</code> on the server's own machine, or serve Facecast over HTTPS (see the README's
     TLS section). Typing still works: use the message box.</p>`,
  );
}

function showMicrophoneProblem(error) {
  if (error.name === "NotAllowedError" || error.name === "SecurityError") {
    showBanner(
      ui.notice,
      `<p><strong>Microphone access is blocked.</strong> Click the site-settings icon at the left of the address bar,
       set <em>Microphone</em> to <em>Allow</em>, then press <strong>Talk</strong> again (on a phone: the browser's
       site settings for this page).</p><p>Typing still works: use the message box.</p>`,
    );
  } else if (error.name === "NotFoundError" || error.name === "OverconstrainedError") {
    showBanner(ui.notice, "<p><strong>No microphone was found.</strong> Plug one in and press Talk again, or type your message.</p>");
  } else if (error.name === "NotReadableError") {
    showBanner(
      ui.notice,
      "<p><strong>The microphone could not be started.</strong> Another app may be using it; close that app and press Talk again, or type your message.</p>",
    );
  } else {
    showError(`The microphone could not be opened: ${error.message}`);
  }
}

// --- state and controls ------------------------------------------------------

function setState(state) {
  ui.state.dataset.state = state;
  ui.state.querySelector(".state-label").textContent = STATE_LABELS[state] ?? state;
}

function renderControls() {
  const withMic = Boolean(session?.microphone);
  const connected = Boolean(session?.connected);
  const connecting = session !== null && !connected;
  ui.talk.classList.toggle("stop", withMic);
  ui.talk.querySelector(".btn-label").textContent = connecting && withMic ? "Connecting…" : withMic ? "Stop" : "Talk";
  ui.talk.title = session && !withMic ? "Reconnect with your microphone" : "";
  ui.talk.disabled = connecting;
  ui.mute.disabled = !withMic;
  ui.mute.hidden = session !== null && !withMic; // a typing-only session has no microphone to mute
  ui.mute.setAttribute("aria-pressed", String(Boolean(session?.muted)));
  ui.mute.querySelector(".btn-label").textContent = session?.muted ? "Unmute" : "Mute";
  ui.interrupt.disabled = !connected;
  ui.end.hidden = !session || withMic;
  ui.send.disabled = connecting;
  ui.meter.classList.toggle("muted", Boolean(session?.muted));
  ui.meter.classList.toggle("off", !withMic);
}

// --- microphone level --------------------------------------------------------

class MicMeter {
  constructor(stream, meter) {
    this.meter = meter;
    this.fill = meter.querySelector(".meter-fill");
    this.context = new AudioContext();
    this.analyser = this.context.createAnalyser();
    this.analyser.fftSize = 1024;
    this.context.createMediaStreamSource(stream).connect(this.analyser);
    this.samples = new Float32Array(this.analyser.fftSize);
    this.context.resume().catch(() => {});
    this.frame = requestAnimationFrame(() => this.draw());
  }

  draw() {
    this.analyser.getFloatTimeDomainData(this.samples);
    let sum = 0;
    for (const sample of this.samples) sum += sample * sample;
    const decibels = 20 * Math.log10(Math.sqrt(sum / this.samples.length) + 1e-9);
    const level = Math.min(1, Math.max(0, (decibels + 60) / 50)); // -60 dBFS..-10 dBFS fills the bar
    this.fill.style.width = `${Math.round(level * 100)}%`;
    this.meter.setAttribute("aria-valuenow", String(Math.round(level * 100)));
    this.frame = requestAnimationFrame(() => this.draw());
  }

  stop() {
    cancelAnimationFrame(this.frame);
    this.context.close().catch(() => {});
    this.fill.style.width = "0%";
    this.meter.setAttribute("aria-valuenow", "0");
  }
}

// --- captions ------------------------------------------------------------------

let captionTimer = null;

function showCaption(role, text) {
  clearTimeout(captionTimer);
  if (!text) return hideCaption();
  ui.captions.textContent = captionText(text, CAPTION_MAX_CHARS);
  ui.captions.className = `captions ${role}`;
  ui.captions.hidden = false;
}

function hideCaption(afterMs = 0) {
  clearTimeout(captionTimer);
  captionTimer = setTimeout(() => (ui.captions.hidden = true), afterMs);
}

// --- chat ----------------------------------------------------------------------

const chat = {
  partial: null, // the user's words while they are still speaking
  replies: new Map(), // turn id -> the avatar's message for that turn
  spoken: new Map(), // turn id -> {written, heard, current}: the reply's text, and how much of it was spoken
  speakingTurn: null,
};

function scrollChat() {
  ui.chat.scrollTop = ui.chat.scrollHeight;
}

function addMessage(role, who) {
  const item = document.createElement("li");
  item.className = `msg ${role}`;
  item.dataset.testid = `${role}-message`;
  const name = document.createElement("span");
  name.className = "msg-who";
  name.textContent = who;
  const text = document.createElement("div");
  text.className = "msg-text";
  item.append(name, text);
  ui.chat.append(item);
  scrollChat();
  return item;
}

function addSystemLine(text, kind = "", testId = "system-message") {
  const item = document.createElement("li");
  item.className = `system ${kind}`;
  item.dataset.testid = testId;
  item.textContent = text;
  ui.chat.append(item);
  scrollChat();
}

function avatarName() {
  return options.personas[session?.persona] ?? "Avatar";
}

function replyMessage(turn) {
  let item = chat.replies.get(turn);
  if (!item) {
    item = addMessage("avatar", avatarName());
    chat.replies.set(turn, item);
  }
  return item;
}

// The reply's text as written so far, with what the avatar has already said, the sentence it is saying
// now, and what it has yet to say told apart, so the learner can read along and read back.
function renderReply(turn) {
  const item = replyMessage(turn);
  const { written, heard, current } = chat.spoken.get(turn) ?? { written: "", heard: 0, current: 0 };
  const parts = [
    ["said", written.slice(0, current)],
    ["saying", written.slice(current, heard)],
    ["unsaid", written.slice(heard)],
  ];
  item.querySelector(".msg-text").replaceChildren(
    ...parts.map(([kind, text]) => {
      const span = document.createElement("span");
      span.className = `msg-${kind}`;
      span.textContent = text;
      return span;
    }),
  );
  scrollChat();
}

function spokenState(turn) {
  if (!chat.spoken.has(turn)) chat.spoken.set(turn, { written: "", heard: 0, current: 0 });
  return chat.spoken.get(turn);
}

function onSpoken({ turn, text }) {
  const state = spokenState(turn);
  const at = state.written.indexOf(text, state.heard);
  state.current = at >= 0 ? at : state.heard;
  state.heard = Math.min(state.written.length, at >= 0 ? at + text.length : state.heard + text.length);
  renderReply(turn);
  chat.speakingTurn = turn;
  showCaption("avatar", text);
}

function onSources({ turn, sources }) {
  const item = replyMessage(turn);
  const list = document.createElement("ul");
  list.className = "msg-sources";
  list.dataset.testid = "sources";
  for (const { document: name, location, snippet } of sources) {
    const entry = document.createElement("li");
    const where = document.createElement("strong");
    where.textContent = location ? `${name}, ${location}` : name;
    entry.append(where, ` — ${snippet}`);
    list.append(entry);
  }
  item.querySelector(".msg-sources")?.remove();
  item.querySelector(".msg-text").after(list);
  scrollChat();
}

function onTranscript({ text, final, typed, language }) {
  if (!final) {
    chat.partial ??= addMessage("user", "You");
    chat.partial.classList.add("partial");
    chat.partial.querySelector(".msg-text").textContent = text;
    scrollChat();
    showCaption("user", text);
    return;
  }
  if (typed) {
    // Typed while speaking: the spoken words keep their own bubble.
    addMessage("user", "You").querySelector(".msg-text").textContent = text;
    hideCaption();
    return;
  }
  const item = chat.partial ?? (text ? addMessage("user", "You") : null);
  chat.partial = null;
  if (!text) {
    item?.remove();
    hideCaption();
    return;
  }
  item.classList.remove("partial");
  item.querySelector(".msg-text").textContent = text;
  if (language) item.querySelector(".msg-who").textContent = `You · ${language}`;
  scrollChat();
  showCaption("user", text);
}

function onReply(event) {
  const state = spokenState(event.turn);
  if (!event.final) {
    replyMessage(event.turn).classList.add("streaming");
    state.written += event.delta;
    renderReply(event.turn);
    return;
  }
  if (!event.text && !chat.replies.has(event.turn)) return; // interrupted before it said anything
  const item = replyMessage(event.turn);
  item.classList.remove("streaming");
  state.written = event.text;
  renderReply(event.turn);
  if (event.interrupted) {
    const tag = document.createElement("span");
    tag.className = "msg-tag";
    tag.textContent = "interrupted";
    item.append(tag);
  }
  scrollChat();
}

function onMetrics({ turn, latency_ms: latency }) {
  const item = chat.replies.get(turn);
  if (!item || !latency) return; // the end-of-reply metrics (longest_gap_ms) are not shown
  const parts = STAGES.filter(([key]) => key in latency).map(([key, name]) => `${name} ${seconds(latency[key])}`);
  const line = document.createElement("span");
  line.className = "msg-latency";
  line.dataset.testid = "latency";
  line.title = "Time from the end of your message to each stage of the reply";
  const total = "first_audio_sent" in latency ? `${seconds(latency.first_audio_sent)} to first audio` : "";
  line.textContent = [total, ...parts].filter(Boolean).join(" · ");
  item.querySelector(".msg-latency")?.remove();
  item.append(line);
}

function seconds(ms) {
  return `${(ms / 1000).toFixed(2)} s`;
}

function onState({ state }) {
  setState(state);
  if (state === "listening") {
    const spoken = chat.spoken.get(chat.speakingTurn);
    if (spoken) {
      spoken.current = spoken.heard; // nothing is being said any more
      renderReply(chat.speakingTurn);
    }
    chat.speakingTurn = null;
    hideCaption(CAPTION_LINGER_MS);
  }
}

function onInterrupted({ reason, stopped_after_ms: stoppedAfter }) {
  const text = INTERRUPT_REASONS[reason] ?? `Interrupted (${reason})`;
  const after = stoppedAfter === undefined ? "" : ` · stopped in ${Math.round(stoppedAfter)} ms`;
  addSystemLine(text + after, "interrupted", "interrupted-marker");
  chat.speakingTurn = null;
  hideCaption();
}

function onServerError({ code, message }) {
  showError(`The server reported an error (${code}): ${message}`);
  addSystemLine(message, "error", "error-message");
}

// --- media -------------------------------------------------------------------

function playVideo() {
  ui.video.play().then(
    () => (ui.playOverlay.hidden = true),
    (error) => {
      // Autoplay with sound needs a user gesture; without one the page asks for a tap.
      if (error.name === "NotAllowedError") ui.playOverlay.hidden = false;
    },
  );
}

function onMedia({ stream }) {
  if (ui.video.srcObject !== stream) ui.video.srcObject = stream;
  playVideo();
}

// --- sessions ------------------------------------------------------------------

function choices() {
  return {
    avatar: ui.avatar.value || undefined,
    voice: ui.voice.value || undefined,
    persona: ui.persona.value || undefined,
  };
}

function wire(client, current) {
  const handlers = {
    session: (event) => {
      current.persona = event.persona;
      const voice = event.voice ? ` · voice ${event.voice}` : "";
      addSystemLine(`Connected to ${avatarName()}${voice}${current.microphone ? "" : " · typing only"}`);
    },
    state: onState,
    transcript: onTranscript,
    reply: onReply,
    spoken: onSpoken,
    sources: onSources,
    metrics: onMetrics,
    interrupted: onInterrupted,
    error: onServerError,
    media: onMedia,
  };
  for (const [type, handler] of Object.entries(handlers)) {
    client.addEventListener(type, (event) => session === current && handler(event.detail));
  }
  client.addEventListener("closed", (event) => {
    // Ignored when this page ended it, or while connecting: then connect() reports the failure.
    if (session !== current || !current.connected) return;
    endSession();
    showError(`The session ended: ${event.detail.reason}.`);
  });
}

function startSession(microphone) {
  hideError();
  const client = new FacecastClient({ iceServers: options.ice_servers, iceTransportPolicy: options.ice_transport_policy });
  const current = { client, microphone, meter: null, connected: false, muted: false, persona: null };
  session = current;
  wire(client, current);
  if (microphone) current.meter = new MicMeter(microphone, ui.meter);
  setState("connecting");
  renderControls();
  current.ready = client.connect({ microphone, ...choices() }).then(
    () => {
      current.connected = true;
      ui.pickerHint.hidden = true;
      renderControls();
      return true;
    },
    (error) => {
      if (session === current) {
        endSession();
        showError(describeError(error));
      } // else the page gave up on it (Stop, End, or a new session) and there is nothing to report
      return false;
    },
  );
  return current;
}

function endSession(message = "") {
  const current = session;
  if (!current) return;
  session = null;
  current.client.close("ended by the page");
  current.meter?.stop();
  current.microphone?.getTracks().forEach((track) => track.stop());
  ui.video.srcObject = null;
  ui.screen.classList.remove("live");
  ui.playOverlay.hidden = true;
  chat.partial?.remove();
  chat.partial = null;
  chat.speakingTurn = null;
  hideCaption();
  setState("offline");
  renderControls();
  if (message) addSystemLine(message);
}

async function openMicrophone() {
  if (!window.isSecureContext || !navigator.mediaDevices?.getUserMedia) {
    showInsecureContextNotice();
    return null;
  }
  try {
    const stream = await navigator.mediaDevices.getUserMedia(MIC_CONSTRAINTS);
    ui.notice.hidden = true;
    return stream;
  } catch (error) {
    showMicrophoneProblem(error);
    return null;
  }
}

async function onTalk() {
  if (session?.microphone) {
    endSession("Session ended.");
    return;
  }
  const microphone = await openMicrophone();
  if (!microphone) return;
  if (session) endSession("Switching to your microphone…"); // a typing-only session cannot add a mic later
  startSession(microphone);
}

async function onSend(event) {
  event.preventDefault();
  const text = ui.input.value.trim();
  if (!text) return;
  const current = session ?? startSession(null);
  if (!(await current.ready) || session !== current) return;
  try {
    current.client.sendText(text);
    ui.input.value = "";
  } catch (error) {
    showError(describeError(error));
  }
}

function onMute() {
  if (!session?.microphone) return;
  session.muted = !session.muted;
  session.microphone.getAudioTracks().forEach((track) => (track.enabled = !session.muted));
  renderControls();
}

function onInterrupt() {
  try {
    session?.client.interrupt();
  } catch (error) {
    showError(describeError(error));
  }
}

// --- documents -----------------------------------------------------------------
// Files dropped on the conversation (or chosen with the button) go into the knowledge base the chosen
// persona answers from. The upload API drives the server, so it answers only this machine until the
// server has an API token; then the page asks for the token once per tab.

function chosenPersona() {
  return session?.persona ?? ui.persona.value ?? options.defaults.persona;
}

function counted(number, noun) {
  return `${number} ${noun}${number === 1 ? "" : "s"}`;
}

function addUploadLine(text, kind = "") {
  addSystemLine(text, kind, "upload-status");
  return ui.chat.lastElementChild;
}

function sendDocuments(url, files, line) {
  const form = new FormData();
  for (const file of files) form.append("files", file, file.name);
  return new Promise((resolve) => {
    const request = new XMLHttpRequest();
    request.open("POST", url);
    const token = sessionStorage.getItem(TOKEN_KEY);
    if (token) request.setRequestHeader("Authorization", `Bearer ${token}`);
    request.upload.onprogress = (event) => {
      if (!event.lengthComputable) return;
      const percent = Math.round((100 * event.loaded) / event.total);
      line.textContent = percent < 100 ? `Uploading… ${percent}%` : "Reading and indexing…";
    };
    request.onload = () => {
      let body = null;
      try {
        body = JSON.parse(request.responseText);
      } catch {}
      resolve({ status: request.status, body });
    };
    request.onerror = () => resolve({ status: 0, body: null });
    request.send(form);
  });
}

async function addDocuments(files) {
  await optionsLoaded; // files can be dropped before the page knows which personas take documents
  const persona = chosenPersona();
  if (!persona) {
    showError("The server's personas could not be loaded, so the documents have nowhere to go: reload the page.");
    return;
  }
  const [base] = options.knowledge?.[persona] ?? [];
  const name = options.personas[persona] ?? persona;
  if (!base) {
    showError(`${name} answers from no documents: choose a persona that does to add them.`);
    return;
  }
  const refused = files.filter((file) => !DOCUMENT_TYPES.some((type) => file.name.toLowerCase().endsWith(type)));
  if (refused.length) {
    showError(`${refused.map((f) => f.name).join(", ")}: only PDF, Markdown, text and HTML files can be added.`);
    return;
  }
  const line = addUploadLine(`Adding ${files.map((f) => f.name).join(", ")} to ${name}'s documents…`);
  let { status, body } = await sendDocuments(`/api/knowledge/${encodeURIComponent(base)}/documents`, files, line);
  if (status === 401) {
    const token = prompt("This server needs its API token (server.api_token) to add documents:");
    if (token) {
      sessionStorage.setItem(TOKEN_KEY, token.trim());
      ({ status, body } = await sendDocuments(`/api/knowledge/${encodeURIComponent(base)}/documents`, files, line));
    }
  }
  if (status === 200 && body) {
    const added = body.added.map((d) => `${d.name} (${d.pages ? `${counted(d.pages, "page")}, ` : ""}${counted(d.passages, "passage")})`);
    line.textContent = `Added to ${name}'s documents: ${added.join(", ")}`;
    line.classList.add("done");
    for (const warning of body.warnings) addUploadLine(warning, "interrupted");
    return;
  }
  const message = body?.error?.message ?? (status ? `the server answered ${status}` : "the server could not be reached");
  line.textContent = `Not added: ${message}`;
  line.classList.add("error");
  showError(`The documents were not added: ${message}`);
}

function wireDocumentDrop() {
  let depth = 0; // dragenter/dragleave fire for every child element crossed
  const showHint = (shown) => {
    ui.dropHint.hidden = !shown;
    ui.chatPanel.classList.toggle("dropping", shown);
  };
  ui.chatPanel.addEventListener("dragenter", (event) => {
    if (!event.dataTransfer?.types.includes("Files")) return;
    depth += 1;
    showHint(true);
  });
  ui.chatPanel.addEventListener("dragleave", () => {
    depth = Math.max(0, depth - 1);
    if (!depth) showHint(false);
  });
  ui.chatPanel.addEventListener("dragover", (event) => event.preventDefault());
  ui.chatPanel.addEventListener("drop", (event) => {
    event.preventDefault();
    depth = 0;
    showHint(false);
    const files = [...(event.dataTransfer?.files ?? [])];
    if (files.length) addDocuments(files);
  });
  ui.upload.addEventListener("click", () => ui.uploadInput.click());
  ui.uploadInput.addEventListener("change", () => {
    const files = [...ui.uploadInput.files];
    ui.uploadInput.value = "";
    if (files.length) addDocuments(files);
  });
}

// --- pickers -------------------------------------------------------------------

function fillSelect(select, entries, selected) {
  select.replaceChildren(
    ...entries.map(([value, label]) => {
      const option = new Option(label, value);
      option.selected = value === selected;
      return option;
    }),
  );
}

async function loadOptions() {
  try {
    options = await fetchOptions();
  } catch (error) {
    showError(`Could not load the avatars, voices and personas: ${describeError(error)}`);
    return;
  }
  fillSelect(ui.avatar, options.avatars.map((name) => [name, name]), options.defaults.avatar);
  fillSelect(ui.voice, [["", "Persona's voice"], ...options.voices.map((name) => [name, name])], "");
  fillSelect(
    ui.persona,
    Object.entries(options.personas).map(([name, display]) => [name, `${display} (${name})`]),
    options.defaults.persona,
  );
}

// --- start -------------------------------------------------------------------------

function init() {
  for (const banner of [ui.notice, ui.error]) {
    banner.querySelector(".banner-close").addEventListener("click", () => (banner.hidden = true));
  }
  ui.talk.addEventListener("click", onTalk);
  ui.end.addEventListener("click", () => endSession("Session ended."));
  ui.mute.addEventListener("click", onMute);
  ui.interrupt.addEventListener("click", onInterrupt);
  ui.composer.addEventListener("submit", onSend);
  ui.playOverlay.addEventListener("click", playVideo);
  wireDocumentDrop();
  ui.video.addEventListener("playing", () => ui.screen.classList.add("live"));
  for (const select of [ui.avatar, ui.voice, ui.persona]) {
    select.addEventListener("change", () => (ui.pickerHint.hidden = !session));
  }
  window.addEventListener("pagehide", () => endSession());
  if (!window.isSecureContext) showInsecureContextNotice();
  renderControls();
  optionsLoaded = loadOptions();
  // For tests and debugging: the live connection, e.g. `facecast.pc.getStats()`.
  window.facecast = {
    get client() {
      return session?.client ?? null;
    },
    get pc() {
      return session?.client.pc ?? null;
    },
  };
}

init();
