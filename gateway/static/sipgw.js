// sipgw.js: the browser client of the sipgw gateway (one ES module, no dependencies).
// Protocol: docs/protocol.md; reference: docs/sdk.md.

/** Minimal event emitter: `on(name, fn)`, `off(name, fn)`. */
class Emitter {
  constructor() { /** @type {Map<string, Set<Function>>} */ this._handlers = new Map(); }
  /** @param {string} name @param {Function} fn @returns {this} */
  on(name, fn) {
    if (!this._handlers.has(name)) this._handlers.set(name, new Set());
    this._handlers.get(name).add(fn);
    return this;
  }
  /** @param {string} name @param {Function} fn @returns {this} */
  off(name, fn) { this._handlers.get(name)?.delete(fn); return this; }
  /** @protected */
  _emit(name, ...args) {
    for (const fn of [...(this._handlers.get(name) || [])]) {
      try { fn(...args); } catch (err) { console.error(`sipgw: ${name} handler failed`, err); }
    }
  }
}

let nextId = 0;
const newId = (prefix) => `${prefix}${Date.now().toString(36)}${(nextId++).toString(36)}`;

/**
 * One call. Events: `ringing`, `progress`, `accepted` (the SIP side answered),
 * `connected` (accepted AND the browser's ICE/DTLS is up), `hangup` ({code, reason, by,
 * outcome}), `dtmf` ({digit}), `held`, `resumed`, `transfer`, `error` ({code, message}).
 */
export class Call extends Emitter {
  /** @param {SipGateway} gw @param {string} id @param {string} direction */
  constructor(gw, id, direction) {
    super();
    this.gw = gw;
    this.id = id;
    /** @type {"outgoing"|"incoming"} */
    this.direction = direction;
    /** @type {string} new, calling, ringing, accepted, connected, ended */
    this.state = "new";
    /** @type {MediaStream|null} */
    this.remoteStream = null;
    /** @type {MediaStream|null} */
    this.localStream = null;
    /** @type {RTCPeerConnection|null} */
    this.pc = null;
    this.muted = false;
    /** true while the call is on hold (after `held`, until `resumed`) */
    this.held = false;
    /** @type {{code:number, reason:string, by:string, outcome:string}|null} */
    this.ended = null;
    this._accepted = false;
    this._iceUp = false;
    this._audio = null;
  }

  /** @returns {Promise<RTCStatsReport|null>} */
  async getStats() { return this.pc ? this.pc.getStats() : null; }

  hangup() {
    if (this.state === "ended") return;
    if (this.state === "incoming") { this.reject(); return; }
    this.gw._send({ type: "hangup", call: this.id });
  }

  /** @param {string} digits 0-9 * # A-D @param {"rfc4733"|"info"} [method] */
  dtmf(digits, method = "rfc4733") { this.gw._send({ type: "dtmf", call: this.id, digits, method }); }

  hold() { this.gw._send({ type: "hold", call: this.id }); }

  unhold() { this.gw._send({ type: "unhold", call: this.id }); }

  /** @param {string} to */
  transfer(to) { this.gw._send({ type: "transfer", call: this.id, to }); }

  /** @param {boolean} [on] */
  mute(on = true) {
    this.muted = on;
    for (const t of this.localStream?.getAudioTracks() || []) t.enabled = !on;
  }

  unmute() { this.mute(false); }

  /** Accept an incoming call. */
  async accept() {
    if (this.state !== "incoming") return;
    this.state = "accepting";
    try {
      await this._media();
      await this.pc.setRemoteDescription({ type: "offer", sdp: this._offer });
      await this.pc.setLocalDescription(await this.pc.createAnswer());
      const sdp = await this._localSdp();
      this.gw._send({ type: "accept", call: this.id, sdp });
      this._trickling = true;
      this._flushCandidates();
    } catch (err) {
      this._fail("media", String(err?.message || err));
      this.gw._send({ type: "reject", call: this.id, code: 488 });
    }
  }

  /** Reject an incoming call. @param {number} [code] SIP status, default 486 */
  reject(code = 486) { this.gw._send({ type: "reject", call: this.id, code }); }

  /** @private */
  async _media() {
    if (!navigator.mediaDevices?.getUserMedia) {
      throw new Error("no microphone access: the page is not in a secure context (https or localhost)");
    }
    this.localStream = await navigator.mediaDevices.getUserMedia({ audio: this.gw.audio });
    this.pc = new RTCPeerConnection({ iceServers: this.gw.iceServers });
    for (const t of this.localStream.getTracks()) this.pc.addTrack(t, this.localStream);
    this._pending = [];
    this.pc.onicecandidate = (e) => {
      if (!this.gw.trickle) return;
      const c = e.candidate && e.candidate.candidate ? e.candidate.toJSON() : null;
      this._pending.push(c);
      if (this._trickling) this._flushCandidates();
    };
    this.pc.ontrack = (e) => {
      this.remoteStream = e.streams[0] || new MediaStream([e.track]);
      if (this.gw.playAudio) {
        this._audio = new Audio();
        this._audio.autoplay = true;
        this._audio.srcObject = this.remoteStream;
        this._audio.play().catch(() => {});
      }
    };
    this.pc.onconnectionstatechange = () => {
      const s = this.pc?.connectionState;
      if (s === "connected") { this._iceUp = true; this._maybeConnected(); }
      else if (s === "failed") this._fail("ice_failed", "the media connection (ICE/DTLS) failed");
    };
  }

  /** @private */
  _flushCandidates() {
    for (const candidate of this._pending.splice(0)) {
      if (this.state !== "ended") this.gw._send({ type: "candidate", call: this.id, candidate });
    }
  }

  /** @private the local SDP: at once when trickling, else after gathering. */
  async _localSdp() {
    if (!this.gw.trickle && this.pc.iceGatheringState !== "complete") {
      await new Promise((resolve) => {
        const done = () => { if (this.pc.iceGatheringState === "complete") resolve(); };
        this.pc.addEventListener("icegatheringstatechange", done);
        setTimeout(resolve, 5000);
      });
    }
    return this.pc.localDescription.sdp;
  }

  /** @private */
  _maybeConnected() {
    if (this._accepted && this._iceUp && this.state !== "connected" && this.state !== "ended") {
      this.state = "connected";
      this._emit("connected");
    }
  }

  /** @private a local failure: hang up with a reason. */
  _fail(code, message) {
    if (this.state === "ended") return;
    this._emit("error", { code, message });
    this.gw._send({ type: "hangup", call: this.id });
    this._end({ code: 0, reason: message, by: "local", outcome: code });
  }

  /** @private */
  _end(info) {
    if (this.state === "ended") return;
    this.state = "ended";
    this.ended = info;
    if (this._audio) { this._audio.pause(); this._audio.srcObject = null; this._audio = null; }
    for (const t of this.localStream?.getTracks() || []) t.stop();
    this.pc?.close();
    this.gw._calls.delete(this.id);
    this._emit("hangup", info);
  }

  /** @private a gateway message about this call. */
  async _on(m) {
    switch (m.type) {
      case "answer":
        try { await this.pc.setRemoteDescription({ type: "answer", sdp: m.sdp }); }
        catch (err) { this._fail("bad_answer", String(err?.message || err)); }
        break;
      case "ringing": this.state = "ringing"; this._emit("ringing", m); break;
      case "progress": this._emit("progress", m); break;
      case "accepted":
        this._accepted = true;
        if (this.state !== "connected") this.state = "accepted";
        this._emit("accepted", m);
        this._maybeConnected();
        break;
      case "held": this.held = true; this._emit("held", m); break;
      case "resumed": this.held = false; this._emit("resumed", m); break;
      case "dtmf": this._emit("dtmf", m); break;
      case "transfer": case "transferred": this._emit("transfer", m); break;
      case "error": this._emit("error", { code: m.code, message: m.message }); break;
      case "hangup":
        this._end({ code: m.code, reason: m.reason, by: m.by, outcome: m.outcome });
        break;
    }
  }
}

/**
 * A connection to the gateway. `await SipGateway.connect(url, {token})`.
 * Events: `incoming` (Call), `registered`, `registration_failed`, `unregistered`,
 * `error`, `disconnected`, `reconnected`; for a developer's log, `message` (every
 * message from the gateway) and `send` (every message to it).
 */
export class SipGateway extends Emitter {
  /**
   * @param {string} [url] ws(s) URL; default: `ws` next to the page (relative).
   * @param {{token?: string, trickle?: boolean, playAudio?: boolean, reconnect?: boolean,
   *   audio?: boolean|MediaTrackConstraints}} [options] `audio`: getUserMedia's audio
   *   constraints (default `true`)
   * @returns {Promise<SipGateway>}
   */
  static async connect(url, options = {}) {
    const gw = new SipGateway(url, options);
    await gw._open();
    return gw;
  }

  constructor(url, options = {}) {
    super();
    this.url = url || new URL("ws", location.href).href.replace(/^http/, "ws");
    this.token = options.token;
    this.trickle = options.trickle !== false;
    this.playAudio = options.playAudio !== false;
    this.reconnect = options.reconnect !== false;
    /** @type {boolean|MediaTrackConstraints} */
    this.audio = options.audio ?? true;
    /** @type {RTCIceServer[]} */
    this.iceServers = [];
    /** @type {Map<string, Call>} */
    this._calls = new Map();
    this._closed = false;
    this._backoff = 500;
  }

  /** @private */
  _open() {
    return new Promise((resolve, reject) => {
      const ws = new WebSocket(this.url);
      this.ws = ws;
      let welcomed = false;
      ws.onopen = () => ws.send(JSON.stringify(this.token ? { type: "hello", token: this.token } : { type: "hello" }));
      ws.onmessage = (e) => {
        const m = JSON.parse(e.data);
        this._emit("message", m);
        if (m.type === "welcome") {
          welcomed = true;
          this._backoff = 500;
          this.iceServers = m.ice_servers || [];
          this.welcome = m;
          resolve(this);
          return;
        }
        if (!welcomed && m.type === "error") { reject(Object.assign(new Error(m.message), { code: m.code })); return; }
        this._dispatch(m);
      };
      ws.onerror = () => { if (!welcomed) reject(new Error(`cannot connect to ${this.url}`)); };
      ws.onclose = () => {
        for (const call of [...this._calls.values()]) {
          call._end({ code: 0, reason: "connection to the gateway lost", by: "local", outcome: "disconnected" });
        }
        if (!welcomed) return;
        this._emit("disconnected");
        if (this.reconnect && !this._closed) this._retry();
      };
    });
  }

  /** @private reconnect with exponential backoff (0.5 s to 30 s). */
  _retry() {
    const delay = this._backoff;
    this._backoff = Math.min(this._backoff * 2, 30000);
    setTimeout(() => {
      if (this._closed) return;
      this._open().then(() => this._emit("reconnected"), () => this._retry());
    }, delay);
  }

  /** @private */
  _send(message) {
    if (this.ws?.readyState === WebSocket.OPEN) {
      this._emit("send", message);
      this.ws.send(JSON.stringify(message));
    }
  }

  /** @private */
  _dispatch(m) {
    if (m.type === "incoming") {
      const call = new Call(this, m.call, "incoming");
      call.state = "incoming";
      call.from = m.from;
      call.displayName = m.display_name;
      call._offer = m.sdp;
      this._calls.set(m.call, call);
      this._emit("incoming", call);
      return;
    }
    const call = m.call ? this._calls.get(m.call) : null;
    if (call) { call._on(m); return; }
    if (["registered", "registration_failed", "unregistered"].includes(m.type)) this._emit(m.type, m);
    else if (m.type === "error") this._emit("error", { code: m.code, message: m.message });
  }

  /**
   * Call `to`. The returned Call is `calling` at once; listen for its events.
   * @param {string} to @param {{headers?: Object<string,string>}} [options]
   * @returns {Call}
   */
  call(to, options = {}) {
    const call = new Call(this, newId("c"), "outgoing");
    this._calls.set(call.id, call);
    call.state = "calling";
    (async () => {
      try {
        await call._media();
        await call.pc.setLocalDescription(await call.pc.createOffer());
        const sdp = await call._localSdp();
        if (call.state === "ended") return;
        const message = { type: "call", call: call.id, to, sdp };
        if (options.headers) message.headers = options.headers;
        this._send(message);
        call._trickling = true;
        call._flushCandidates();
      } catch (err) {
        call._emit("error", { code: "media", message: String(err?.message || err) });
        call._end({ code: 0, reason: String(err?.message || err), by: "local", outcome: "media" });
      }
    })();
    return call;
  }

  /** @param {{user: string, password?: string, display_name?: string, domain?: string}} account */
  register(account) { this._send({ type: "register", ...account }); }

  /** @param {string} user */
  unregister(user) { this._send({ type: "unregister", user }); }

  /** Close the connection for good (no reconnect). */
  close() { this._closed = true; this.ws?.close(); }
}

export default SipGateway;
