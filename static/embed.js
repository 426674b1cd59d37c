// Facecast embed: one <script> tag puts a talking avatar on any web site.
//
//   <script src="https://facecast.example.com/embed.js" async
//           data-position="bottom-right"  data-avatar="default" data-persona="assistant"></script>
//
// data-server    the Facecast server (default: where this script was loaded from)
// data-position  bottom-right (default) or bottom-left: a floating bubble that opens a panel;
//                inline: the panel itself, in place of the script tag (or in data-target)
// data-target    a CSS selector for where an inline panel goes
// data-avatar, data-persona, data-voice   names from the server's /api/options (default: its defaults)
// data-title     the panel's heading (default: the persona's display name)
//
// The server must list this site's origin in server.allowed_origins; if it does not, the panel says
// so (the server's refusal carries the reason). Everything lives in a shadow root, so the site's CSS
// and the widget's cannot affect each other.
(() => {
  const script = document.currentScript;
  const data = script.dataset;
  const server = (data.server || new URL(script.src).origin).replace(/\/$/, "");
  const position = ["bottom-right", "bottom-left", "inline"].includes(data.position) ? data.position : "bottom-right";
  const choices = { avatar: data.avatar || undefined, persona: data.persona || undefined, voice: data.voice || undefined };
  const MIC_CONSTRAINTS = { audio: { echoCancellation: true, noiseSuppression: true, autoGainControl: true } };

  const STYLE = `
    :host { all: initial; font: 14px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; color: #e6edf3; }
    * { box-sizing: border-box; }
    .bubble { position: fixed; bottom: 20px; z-index: 2147483000; width: 60px; height: 60px; border-radius: 50%;
      border: 0; cursor: pointer; background: conic-gradient(from 200deg, #6c8cff, #9b6cff, #3fb9b0, #6c8cff);
      box-shadow: 0 6px 24px rgba(0,0,0,.35); display: grid; place-items: center; }
    .bubble svg { width: 28px; height: 28px; fill: none; stroke: #fff; stroke-width: 2; }
    .right { right: 20px; } .left { left: 20px; }
    .panel { width: 320px; max-width: calc(100vw - 24px); background: #0d1117; border: 1px solid #232c38;
      border-radius: 14px; overflow: hidden; box-shadow: 0 10px 30px rgba(0,0,0,.35); display: flex; flex-direction: column; }
    .floating { position: fixed; bottom: 92px; z-index: 2147483000; }
    .panel[hidden] { display: none; }
    header { display: flex; align-items: center; justify-content: space-between; padding: 8px 12px; font-weight: 650; }
    header button { background: none; border: 0; color: #8b98a8; font-size: 20px; cursor: pointer; }
    .screen { position: relative; aspect-ratio: 1; background: #000; }
    video { width: 100%; height: 100%; object-fit: cover; display: block; }
    .caption { position: absolute; left: 8px; right: 8px; bottom: 8px; text-align: center; color: #fff;
      background: rgba(0,0,0,.55); border-radius: 8px; padding: 4px 8px; }
    .caption:empty { display: none; }
    .notice { padding: 10px 12px; background: #2b1417; color: #ffc9cd; }
    .notice:empty { display: none; }
    form { display: flex; gap: 6px; padding: 10px; }
    input { flex: 1; min-width: 0; padding: 8px 10px; border-radius: 8px; border: 1px solid #232c38;
      background: #0a0e14; color: inherit; font: inherit; }
    form button { padding: 8px 12px; border-radius: 8px; border: 0; background: #5273f5; color: #fff; font: inherit; cursor: pointer; }
    form button.mic.on { background: #3a1d23; color: #ffc9cd; }
    form button:disabled { opacity: .5; }
  `;
  const PANEL = `
    <header><span class="title">Chat</span><button class="close" type="button" aria-label="Close">&times;</button></header>
    <div class="screen"><video autoplay playsinline></video><div class="caption" data-testid="embed-caption"></div></div>
    <div class="notice" data-testid="embed-notice" role="alert"></div>
    <form autocomplete="off">
      <button class="mic" type="button" title="Talk with your microphone">Talk</button>
      <input name="text" maxlength="2000" placeholder="Type a message…" aria-label="Message">
      <button class="send" type="submit">Send</button>
    </form>`;

  const host = document.createElement("div");
  host.dataset.facecastEmbed = position;
  const root = host.attachShadow({ mode: "open" });
  root.innerHTML = `<style>${STYLE}</style>`;
  const panel = document.createElement("div");
  panel.className = "panel";
  panel.setAttribute("data-testid", "embed-panel");
  panel.innerHTML = PANEL;
  const $ = (selector) => panel.querySelector(selector);
  const ui = { title: $(".title"), video: $("video"), caption: $(".caption"), notice: $(".notice"), form: $("form"),
    input: $("input"), mic: $(".mic"), send: $(".send"), close: $(".close") };

  let facecast = null; // the module, imported once the server has accepted this origin
  let options = null;
  let session = null; // {client, microphone, ready}
  let reply = { turn: null, text: "" };

  function notice(text) {
    ui.notice.textContent = text;
  }

  async function serverOptions() {
    // A plain fetch first: a refused origin gets the server's reason, which a failed module import would hide.
    let response;
    try {
      response = await fetch(`${server}/api/options`);
    } catch (error) {
      throw new Error(`cannot reach the Facecast server at ${server}`);
    }
    const body = await response.json().catch(() => ({}));
    if (!response.ok) throw new Error(body.error?.message || `the Facecast server refused (${response.status})`);
    return body;
  }

  async function prepare() {
    if (facecast) return;
    options = await serverOptions();
    facecast = await import(`${server}/static/facecast.js`);
    const persona = choices.persona || options.defaults.persona;
    ui.title.textContent = data.title || options.personas[persona] || "Chat";
  }

  function onReply(event) {
    if (reply.turn !== event.turn) reply = { turn: event.turn, text: "" };
    reply.text = event.final ? event.text : reply.text + event.delta;
    ui.caption.textContent = reply.text;
    panel.dataset.reply = reply.text;
  }

  function endSession() {
    session?.client.close("closed by the page");
    session?.microphone?.getTracks().forEach((track) => track.stop());
    session = null;
    ui.mic.classList.remove("on");
    ui.mic.textContent = "Talk";
  }

  function startSession(microphone) {
    endSession();
    const client = new facecast.FacecastClient({
      baseUrl: server,
      iceServers: options.ice_servers,
      iceTransportPolicy: options.ice_transport_policy,
    });
    const current = { client, microphone };
    session = current;
    client.addEventListener("media", (event) => {
      ui.video.srcObject = event.detail.stream;
      ui.video.play().catch(() => {});
    });
    client.addEventListener("reply", (event) => onReply(event.detail));
    client.addEventListener("transcript", (event) => event.detail.final && (ui.caption.textContent = event.detail.text));
    client.addEventListener("state", (event) => (panel.dataset.state = event.detail.state));
    client.addEventListener("closed", () => session === current && endSession());
    current.ready = client.connect({ microphone, ...choices }).then(
      () => true,
      (error) => {
        if (session === current) endSession();
        notice(error.message);
        return false;
      },
    );
    return current;
  }

  async function open() {
    panel.hidden = false;
    try {
      await prepare();
      notice("");
    } catch (error) {
      panel.dataset.refused = "true";
      notice(`This site cannot use this avatar: ${error.message}.`);
      ui.send.disabled = ui.mic.disabled = ui.input.disabled = true;
    }
  }

  async function onSend(event) {
    event.preventDefault();
    const text = ui.input.value.trim();
    if (!text || !facecast) return;
    const current = session ?? startSession(null);
    if (!(await current.ready) || session !== current) return;
    current.client.sendText(text);
    ui.input.value = "";
  }

  async function onMic() {
    if (!facecast) return;
    if (session?.microphone) return endSession();
    try {
      const microphone = await navigator.mediaDevices.getUserMedia(MIC_CONSTRAINTS);
      startSession(microphone);
      ui.mic.classList.add("on");
      ui.mic.textContent = "Stop";
    } catch (error) {
      notice(`The microphone could not be opened (${error.name}); type instead.`);
    }
  }

  ui.form.addEventListener("submit", onSend);
  ui.mic.addEventListener("click", onMic);
  window.addEventListener("pagehide", endSession);

  if (position === "inline") {
    ui.close.hidden = true;
    root.append(panel);
    const target = data.target ? document.querySelector(data.target) : null;
    if (target) target.append(host);
    else script.after(host);
    open();
  } else {
    const side = position === "bottom-left" ? "left" : "right";
    const bubble = document.createElement("button");
    bubble.className = `bubble ${side}`;
    bubble.type = "button";
    bubble.setAttribute("aria-label", "Talk with the avatar");
    bubble.setAttribute("data-testid", "embed-bubble");
    bubble.innerHTML = '<svg viewBox="0 0 24 24"><path d="M4 5h16v11H9l-5 4z"/></svg>';
    panel.classList.add("floating", side);
    panel.hidden = true;
    bubble.addEventListener("click", () => (panel.hidden ? open() : (panel.hidden = true)));
    ui.close.addEventListener("click", () => {
      panel.hidden = true;
      endSession();
    });
    root.append(bubble, panel);
    (document.body ? Promise.resolve() : new Promise((resolve) => addEventListener("DOMContentLoaded", resolve))).then(() =>
      document.body.append(host),
    );
  }
})();
