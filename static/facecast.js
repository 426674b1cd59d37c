// Facecast browser client: WebRTC signalling with a Facecast server and its `events` data channel.
// No UI here, so the talk page, kiosk, OBS and embed pages can all share it.
//
//   const options = await fetchOptions();
//   const client = new FacecastClient({ iceServers: options.ice_servers, iceTransportPolicy: options.ice_transport_policy });
//   client.addEventListener("reply", (e) => console.log(e.detail));
//   client.addEventListener("media", (e) => (video.srcObject = e.detail.stream));
//   await client.connect({ microphone: micStream, persona: "assistant" });
//   client.sendText("Hello!");
//
// Every server event is re-dispatched as a CustomEvent named after its "type" (session, state,
// transcript, reply, metrics, interrupted, resumed, error, pong), with the parsed message as `detail`.
// `watch(broadcastId)` instead of `connect()` attaches to a broadcast session as a receive-only
// viewer over WHEP: the same media and events, nothing sent.
// The client adds: "media" ({stream}) when the avatar's first track arrives, "connection"
// ({state}) on each RTCPeerConnection state change, and "closed" ({reason}) once it has ended.

const ICE_GATHERING_TIMEOUT_MS = 3000;
// This tab's conversation, kept across reconnections: a Facecast cluster resumes its history on
// whichever node the next session lands on (see docs/protocol.md, "Conversations").
const CONVERSATION_KEY = "facecast.conversation";
const CHANNEL_OPEN_TIMEOUT_MS = 20000;

/** A refused request: the HTTP status and the server's {"error": {code, message}} body. */
export class FacecastError extends Error {
  constructor(message, { status = 0, code = "network", retryAfterS = null } = {}) {
    super(message);
    this.name = "FacecastError";
    this.status = status;
    this.code = code;
    this.retryAfterS = retryAfterS;
  }
}

async function errorFrom(response) {
  let code = `http_${response.status}`;
  let message = `${response.status} ${response.statusText}`;
  try {
    const body = await response.json();
    if (body && body.error) {
      code = body.error.code || code;
      message = body.error.message || message;
    }
  } catch {
    // Not JSON (a proxy's error page, say): the status line is all there is.
  }
  const retry = response.headers.get("Retry-After");
  return new FacecastError(message, { status: response.status, code, retryAfterS: retry ? Number(retry) : null });
}

async function send(url, init) {
  let response;
  try {
    response = await fetch(url, init);
  } catch (error) {
    throw new FacecastError(`cannot reach the Facecast server (${error.message})`);
  }
  if (!response.ok) throw await errorFrom(response);
  return response;
}

async function request(url, init) {
  return (await send(url, init)).json();
}

/** GET /api/options: {avatars, personas: {name: display name}, voices, defaults, ice_servers, ice_transport_policy}. */
/** The end of a long caption, cut at a word boundary so it fits in `maxChars`. */
export function captionText(text, maxChars) {
  const shown = (text || "").trim();
  if (shown.length <= maxChars) return shown;
  const tail = shown.slice(-maxChars);
  return `…${tail.slice(tail.indexOf(" ") + 1)}`;
}

export function fetchOptions(baseUrl = "") {
  return request(`${baseUrl}/api/options`);
}

function iceGatheringComplete(pc) {
  // The server does not take trickled candidates, so the offer must carry them all.
  if (pc.iceGatheringState === "complete") return Promise.resolve();
  return new Promise((resolve) => {
    const done = () => {
      pc.removeEventListener("icegatheringstatechange", check);
      clearTimeout(timer);
      resolve();
    };
    const check = () => pc.iceGatheringState === "complete" && done();
    const timer = setTimeout(done, ICE_GATHERING_TIMEOUT_MS);
    pc.addEventListener("icegatheringstatechange", check);
  });
}

function channelOpen(channel) {
  if (channel.readyState === "open") return Promise.resolve();
  return new Promise((resolve, reject) => {
    const timer = setTimeout(
      () => reject(new FacecastError("the events channel did not open: the media connection failed", { code: "no_connection" })),
      CHANNEL_OPEN_TIMEOUT_MS,
    );
    channel.addEventListener("open", () => {
      clearTimeout(timer);
      resolve();
    }, { once: true });
    channel.addEventListener("close", () => {
      clearTimeout(timer);
      reject(new FacecastError("the events channel closed before it opened", { code: "no_connection" }));
    }, { once: true });
  });
}

/** The conversation id this tab keeps (sessionStorage), or null. */
export function savedConversation() {
  try {
    return sessionStorage.getItem(CONVERSATION_KEY);
  } catch {
    return null; // storage disabled: every session is a fresh conversation
  }
}

/** Start afresh: the next session of this tab is a new conversation (a kiosk's next visitor). */
export function forgetConversation() {
  try {
    sessionStorage.removeItem(CONVERSATION_KEY);
  } catch {
    // storage disabled: nothing kept
  }
}

function keepConversation(id) {
  try {
    if (id) sessionStorage.setItem(CONVERSATION_KEY, id);
  } catch {
    // storage disabled: the conversation ends with the session
  }
}

export class FacecastClient extends EventTarget {
  /**
   * @param {{baseUrl?: string, iceServers?: RTCIceServer[], iceTransportPolicy?: RTCIceTransportPolicy}} options
   */
  constructor({ baseUrl = "", iceServers = [], iceTransportPolicy = "all" } = {}) {
    super();
    this.baseUrl = baseUrl;
    this.iceServers = iceServers;
    this.iceTransportPolicy = iceTransportPolicy;
    this.pc = null;
    this.channel = null;
    this.sessionId = null;
    this.resourceUrl = null; // what close() deletes: the session, or the WHEP viewer
    this.state = "idle"; // the avatar's last reported state: listening, thinking or speaking
    this.remoteStream = new MediaStream();
    this.closed = false;
  }

  get connected() {
    return !this.closed && this.channel !== null && this.channel.readyState === "open";
  }

  /**
   * Open a session. With a microphone stream its audio track is sent; without one the client
   * only receives (it can still type). avatar, voice and persona are names from /api/options;
   * leave them out for the server's defaults. `video: false` asks for audio only. `conversation`
   * (default: the one this tab kept) continues an earlier conversation; the server's `session`
   * event names the conversation, and the client keeps it for the next connect().
   */
  async connect({ microphone = null, avatar, voice, persona, video = true, conversation = savedConversation() } = {}) {
    await this._negotiate({ microphone, video }, async (offerSdp) => {
      const body = { sdp: offerSdp, type: "offer" };
      if (conversation) body.conversation = conversation;
      if (avatar) body.avatar = avatar;
      if (voice) body.voice = voice;
      if (persona) body.persona = persona;
      const answer = await request(`${this.baseUrl}/offer`, {
        method: "POST",
        headers: { "Content-Type": "application/json" },
        body: JSON.stringify(body),
      });
      this.sessionId = answer.session_id;
      this.resourceUrl = `${this.baseUrl}/sessions/${answer.session_id}`;
      return answer.sdp;
    });
  }

  /**
   * Watch a broadcast session (the server's default one when `broadcastId` is empty) as a
   * receive-only WHEP viewer. Its events (state, reply, …) arrive as with connect().
   */
  async watch(broadcastId = "", { video = true } = {}) {
    await this._negotiate({ microphone: null, video }, async (offerSdp) => {
      const path = broadcastId ? `/whep/${encodeURIComponent(broadcastId)}` : "/whep";
      const response = await send(`${this.baseUrl}${path}`, {
        method: "POST",
        headers: { "Content-Type": "application/sdp" },
        body: offerSdp,
      });
      this.sessionId = broadcastId || null;
      this.resourceUrl = new URL(response.headers.get("Location"), new URL(path, this.baseUrl || location.href)).href;
      return response.text();
    });
  }

  /** Offer, exchange it with `signal(offerSdp) → answerSdp`, then wait for the events channel. */
  async _negotiate({ microphone, video }, signal) {
    if (this.pc) throw new Error("a FacecastClient connects once; make a new one for a new session");
    const pc = new RTCPeerConnection({ iceServers: this.iceServers, iceTransportPolicy: this.iceTransportPolicy });
    this.pc = pc;
    pc.addEventListener("track", (event) => this._onTrack(event));
    pc.addEventListener("connectionstatechange", () => this._onConnectionState());

    const micTrack = microphone ? microphone.getAudioTracks()[0] : null;
    if (micTrack) pc.addTrack(micTrack, microphone);
    else pc.addTransceiver("audio", { direction: "recvonly" });
    if (video) pc.addTransceiver("video", { direction: "recvonly" });
    // The channel must exist before the offer, so the offer has a data section.
    this.channel = pc.createDataChannel("events");
    this.channel.addEventListener("message", (event) => this._onMessage(event.data));
    this.channel.addEventListener("close", () => this.close("the server ended the session"));

    try {
      await pc.setLocalDescription(await pc.createOffer());
      await iceGatheringComplete(pc);
      const answerSdp = await signal(pc.localDescription.sdp);
      await pc.setRemoteDescription({ type: "answer", sdp: answerSdp });
      await channelOpen(this.channel);
    } catch (error) {
      this.close(error.message);
      throw error;
    }
  }

  /** Send one event on the data channel (see docs/protocol.md). */
  send(event) {
    if (!this.connected) throw new FacecastError("not connected", { code: "not_connected" });
    this.channel.send(JSON.stringify(event));
  }

  sendText(text) {
    this.send({ type: "text", text });
  }

  /** Have the avatar speak `text` word for word, without the language model. */
  say(text) {
    this.send({ type: "say", text });
  }

  interrupt() {
    this.send({ type: "interrupt" });
  }

  ping() {
    this.send({ type: "ping" });
  }

  /** End the session: tell the server (best effort) and release the connection. */
  close(reason = "closed") {
    if (this.closed) return;
    this.closed = true;
    if (this.resourceUrl) {
      // keepalive lets the request finish even when the page is being unloaded.
      fetch(this.resourceUrl, { method: "DELETE", keepalive: true }).catch(() => {});
    }
    if (this.pc) this.pc.close();
    this.dispatchEvent(new CustomEvent("closed", { detail: { reason } }));
  }

  _onTrack(event) {
    this.remoteStream.addTrack(event.track);
    this.dispatchEvent(new CustomEvent("media", { detail: { stream: this.remoteStream, track: event.track } }));
  }

  _onConnectionState() {
    const state = this.pc.connectionState;
    this.dispatchEvent(new CustomEvent("connection", { detail: { state } }));
    if (state === "failed") this.close("the media connection failed");
  }

  _onMessage(data) {
    let event;
    try {
      event = JSON.parse(data);
    } catch {
      return; // the server only sends JSON; anything else is not ours to interpret
    }
    if (!event || typeof event.type !== "string") return;
    if (event.type === "state") this.state = event.state;
    if (event.type === "session" && !event.broadcast) keepConversation(event.conversation);
    this.dispatchEvent(new CustomEvent(event.type, { detail: event }));
  }
}

/**
 * Keeps a connection up: calls `connect()` until it succeeds, waiting longer after each failure
 * (minDelayMs, doubling up to maxDelayMs, ±20 % jitter so that many clients do not all come back
 * at the same instant after a server restart). Call `retry()` when an established connection
 * drops; a success resets the delay. A 503's Retry-After is honoured.
 */
export class Reconnector {
  constructor(connect, { minDelayMs = 1000, maxDelayMs = 15000, onWait = () => {} } = {}) {
    this.connect = connect;
    this.minDelayMs = minDelayMs;
    this.maxDelayMs = maxDelayMs;
    this.onWait = onWait;
    this.delayMs = minDelayMs;
    this.timer = null;
    this.running = false;
    this.stopped = false;
  }

  async start() {
    if (this.running || this.stopped) return;
    this.running = true;
    try {
      await this.connect();
      this.delayMs = this.minDelayMs;
    } catch (error) {
      this._schedule(error);
    } finally {
      this.running = false;
    }
  }

  retry(reason = null) {
    if (!this.stopped && !this.running && this.timer === null) this._schedule(reason);
  }

  stop() {
    this.stopped = true;
    clearTimeout(this.timer);
    this.timer = null;
  }

  _schedule(error) {
    const retryAfterMs = error instanceof FacecastError && error.retryAfterS ? error.retryAfterS * 1000 : 0;
    const waitMs = Math.max(retryAfterMs, this.delayMs * (0.8 + 0.4 * Math.random()));
    this.delayMs = Math.min(this.maxDelayMs, this.delayMs * 2);
    this.onWait({ error, waitMs });
    clearTimeout(this.timer);
    this.timer = setTimeout(() => {
      this.timer = null;
      this.start();
    }, waitMs);
  }
}
