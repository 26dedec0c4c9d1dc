// roomcast.js: the browser client of roomcast's /ws protocol (docs/protocol.md, docs/browser.md).
// An ES module without dependencies or build step. Mirrors the Python client (roomcast.client):
// reconnects with exponential backoff and full jitter, resubscribes with `recover` from the last
// offset and epoch delivered, and hands every publication to the page once, in offset order.

/** Close codes after which reconnecting cannot help (kicked through the API; policy). */
const TERMINAL_CLOSE_CODES = new Set([4001, 1008]);

/** An error reply of the server ({code, message}), or a client-side failure. */
export class RoomcastError extends Error {
  constructor(code, message) {
    super(`${code}: ${message}`);
    this.name = "RoomcastError";
    this.code = code;
  }
}

/** Error codes of requests that never reached a live connection (retried on the next one). */
const LOST = new Set(["connection_lost", "not_connected"]);

const emit = (target, type, detail) => target.dispatchEvent(new CustomEvent(type, { detail }));

/** A channel subscription: publication, join, leave, recovered, subscribed and end events. */
export class Subscription extends EventTarget {
  constructor(client, channel, joinLeave) {
    super();
    this.client = client;
    this.channel = channel;
    this.joinLeave = joinLeave;
    /** The epoch and offset of the last publication delivered (or the starting point). */
    this.epoch = null;
    this.offset = 0;
    /** Reconnections that replayed everything missed, and those that could not. */
    this.recoveries = 0;
    this.gaps = 0;
    this.active = true;
    this._sentOn = 0; // the connection a subscribe was last sent on
    this._ready = new Promise((resolve, reject) => {
      this._resolve = resolve;
      this._reject = reject;
    });
    this._ready.catch(() => {}); // reported through ready() and the "end" event
  }

  /** Resolves once the first subscribe succeeded; rejects if it failed or the client closed. */
  ready() {
    return this._ready;
  }

  /** Stop receiving this channel. */
  unsubscribe() {
    return this.client._unsubscribe(this);
  }

  _subscribed(result) {
    if (result.recovered === true) this.recoveries += 1;
    else if (result.recovered === false) {
      this.gaps += 1;
      // A new history stream: the server replays all it holds of it, from offset 1.
      if (result.epoch !== this.epoch) this.offset = 0;
    } else this.offset = result.offset;
    this.epoch = result.epoch;
    this._resolve(result);
    if ("recovered" in result) {
      emit(this, "recovered", { recovered: result.recovered, replayed: result.replayed });
    }
    emit(this, "subscribed", result);
  }

  _publication(frame) {
    if (frame.offset <= this.offset) return; // already delivered: an overlapping replay
    this.offset = frame.offset;
    const { channel, offset, data, info } = frame;
    emit(this, "publication", { channel, offset, data, info, epoch: this.epoch });
  }

  _end(error) {
    if (!this.active) return;
    this.active = false;
    this._reject(error || new RoomcastError("unsubscribed", "the subscription ended"));
    emit(this, "end", { error: error || null });
  }
}

/** A /ws connection that survives reconnects. Make one with connect(). */
export class Client extends EventTarget {
  constructor(url, options = {}) {
    super();
    this.url = url;
    this.token = options.token ?? null;
    this.backoffMin = options.backoffMin ?? 250;
    this.backoffMax = options.backoffMax ?? 10000;
    this.requestTimeout = options.requestTimeout ?? 10000;
    this.pingInterval = options.pingInterval ?? 25000;
    this.state = "connecting";
    /** This connection's id and user (the server's `connected` push). */
    this.clientId = null;
    this.user = null;
    /** How many times the connection was established (1 + reconnections). */
    this.connections = 0;
    /** Why the client stopped for good, if it did. */
    this.error = null;
    this.subscriptions = new Map();
    this._ws = null;
    this._live = false; // `connected` push seen on this._ws
    this._ids = 0;
    this._waiting = new Map(); // request id -> {resolve, reject, sub}
    this._waiters = new Set(); // callbacks run at each state change
    this._attempt = 0;
    this._timer = null;
    this._opening = false;
    this._heartbeat = null;
    this._lastFrame = 0;
    this._refusedOnce = false;
    this._onOnline = () => this._online();
    this._onOffline = () => this._offline();
    if (typeof window !== "undefined") {
      window.addEventListener("online", this._onOnline);
      window.addEventListener("offline", this._onOffline);
    }
    this._open("connect");
  }

  // -- lifecycle ----------------------------------------------------------------------------

  /** Resolves once connected; rejects if the client stops for good first. */
  ready() {
    return this._until(() => this.state === "connected");
  }

  /** Close the connection for good and end every subscription. */
  close() {
    this._stop(null);
  }

  _setState(state, extra = {}) {
    if (this.state === state) return;
    const previous = this.state;
    this.state = state;
    emit(this, "state", { state, previous, ...extra });
    for (const check of [...this._waiters]) check();
  }

  /** A promise for `predicate()`, checked now and at each state change; bounded by `ms`. */
  _until(predicate, ms = null) {
    return new Promise((resolve, reject) => {
      let timer = null;
      const check = () => {
        if (this.state === "closed" && !predicate()) {
          done();
          reject(this.error || new RoomcastError("closed", "the client was closed"));
        } else if (predicate()) {
          done();
          resolve();
        }
      };
      const done = () => {
        this._waiters.delete(check);
        clearTimeout(timer);
      };
      if (ms !== null) {
        timer = setTimeout(() => {
          done();
          reject(new RoomcastError("timeout", `no connection within ${ms} ms`));
        }, ms);
      }
      this._waiters.add(check);
      check();
    });
  }

  _stop(error) {
    if (this.state === "closed") return;
    this.error = error;
    clearTimeout(this._timer);
    clearInterval(this._heartbeat);
    if (typeof window !== "undefined") {
      window.removeEventListener("online", this._onOnline);
      window.removeEventListener("offline", this._onOffline);
    }
    const ws = this._ws;
    this._drop();
    if (ws) ws.close(1000);
    this._setState("closed", { error });
    for (const sub of this.subscriptions.values()) sub._end(error);
    this.subscriptions.clear();
  }

  _backoff(attempt) {
    // Exponential backoff with full jitter (AWS architecture blog's "full jitter").
    const ceiling = Math.min(this.backoffMax, this.backoffMin * 2 ** Math.min(attempt, 30));
    return this.backoffMin / 2 + Math.random() * (ceiling - this.backoffMin / 2);
  }

  _retry(delay) {
    clearTimeout(this._timer);
    if (this.state === "closed") return;
    if (typeof navigator !== "undefined" && navigator.onLine === false) {
      this._setState("offline");
      return; // the `online` event reconnects
    }
    this._timer = setTimeout(() => this._open("connect"), delay);
  }

  /** "connecting" until the first connection, "reconnecting" after. */
  _trying() {
    this._setState(this.connections ? "reconnecting" : "connecting");
  }

  _online() {
    if (this.state === "closed" || this._ws || this._opening) return;
    this._attempt = 0; // the network is back: try at once
    clearTimeout(this._timer);
    this._trying();
    this._open("connect");
  }

  _offline() {
    if (this.state === "closed") return;
    clearTimeout(this._timer);
    const ws = this._ws;
    this._drop();
    if (ws) ws.close(1000);
    this._setState("offline");
  }

  async _token(reason) {
    const source = this.token;
    if (typeof source === "function") return (await source({ reason })) || null;
    return source || null;
  }

  async _open(reason) {
    this._timer = null;
    if (this.state === "closed" || this._ws || this._opening) return;
    if (typeof navigator !== "undefined" && navigator.onLine === false) {
      this._setState("offline");
      return;
    }
    if (this.state === "offline") this._trying();
    let token;
    this._opening = true;
    try {
      token = await this._token(reason);
    } catch (error) {
      if (this.state === "closed") return;
      console.warn("roomcast: the token function failed:", error);
      this._attempt += 1;
      this._retry(this._backoff(this._attempt));
      return;
    } finally {
      this._opening = false;
    }
    if (this.state === "closed" || this._ws) return;
    let ws;
    try {
      ws = new WebSocket(this.url, token ? ["roomcast", `roomcast.token.${token}`] : ["roomcast"]);
    } catch (error) {
      this._stop(new RoomcastError("bad_url", String(error && error.message)));
      return;
    }
    this._ws = ws;
    this._live = false;
    let opened = false;
    let since = 0;
    ws.onopen = () => {
      opened = true;
      since = Date.now();
    };
    ws.onmessage = (event) => {
      if (this._ws === ws) this._frame(ws, event.data);
    };
    ws.onclose = (event) => {
      if (this._ws !== ws) return; // dropped by us already
      this._drop();
      this._closed(event.code, opened, Date.now() - since);
    };
  }

  /** Forget the current socket: fail what is in flight (it may or may not have happened). */
  _drop() {
    const ws = this._ws;
    this._ws = null;
    this._live = false;
    clearInterval(this._heartbeat);
    if (ws) ws.onclose = ws.onmessage = ws.onopen = null;
    const waiting = [...this._waiting.values()];
    this._waiting.clear();
    const lost = new RoomcastError("connection_lost", "the connection dropped");
    for (const w of waiting) w.reject(lost);
  }

  async _closed(code, opened, lasted) {
    if (this.state === "closed") return;
    if (TERMINAL_CLOSE_CODES.has(code)) {
      this._stop(new RoomcastError("disconnected", `closed by the server with code ${code}`));
      return;
    }
    if (!opened && (await this._reachable())) {
      // The server is up but refused the handshake (HTTP 403: a bad token or a foreign origin;
      // browsers hide which). One more try at once, in case the server was only just starting;
      // a token function is asked for a fresh token for it ({reason: "refused"}).
      if (this.state === "closed" || this._ws) return;
      if (!this._refusedOnce) {
        this._refusedOnce = true;
        this._trying();
        this._open("refused");
        return;
      }
      this._stop(new RoomcastError("refused", "the server refused the connection"));
      return;
    }
    if (this.state === "closed" || this._ws) return;
    this._refusedOnce = false;
    // A connection that lasted counts as a success; one closed at once backs off further.
    this._attempt = opened && lasted > Math.max(5000, this.backoffMax) ? 1 : this._attempt + 1;
    if (this.state !== "offline") this._trying();
    this._retry(this._backoff(this._attempt));
  }

  /** Whether the server answers plain HTTP (so a failed handshake was a refusal). */
  async _reachable() {
    const url = this.url.replace(/^ws/, "http");
    const abort = new AbortController();
    const timer = setTimeout(() => abort.abort(), this.requestTimeout);
    try {
      await fetch(url, { mode: "no-cors", cache: "no-store", signal: abort.signal });
      return true;
    } catch {
      return false;
    } finally {
      clearTimeout(timer);
    }
  }

  _frame(ws, text) {
    this._lastFrame = Date.now();
    let frame;
    try {
      frame = JSON.parse(text);
    } catch {
      return;
    }
    if ("id" in frame) {
      const waiting = this._waiting.get(frame.id);
      if (!waiting) return;
      this._waiting.delete(frame.id);
      if (frame.ok) {
        // Now, before reading on: the replayed publications follow at once.
        if (waiting.sub && waiting.sub.active) waiting.sub._subscribed(frame.result);
        waiting.resolve(frame.result);
      } else {
        waiting.reject(new RoomcastError(frame.error.code, frame.error.message));
      }
      return;
    }
    const sub = frame.channel !== undefined ? this.subscriptions.get(frame.channel) : undefined;
    switch (frame.type) {
      case "publication":
        if (sub) sub._publication(frame);
        break;
      case "join":
      case "leave":
        if (sub) emit(sub, frame.type, { channel: frame.channel, info: frame.info });
        break;
      case "unsubscribed":
        // The server ended it (a fresh token without this channel): for good, not resubscribed.
        if (sub) {
          this.subscriptions.delete(frame.channel);
          sub._end(new RoomcastError("unsubscribed", frame.reason));
        }
        break;
      case "refresh":
        if (typeof this.token === "function") this._refresh();
        break;
      case "connected":
        this.clientId = frame.client;
        this.user = frame.user;
        this.connections += 1;
        this._live = true;
        this._lastFrame = Date.now();
        this._startHeartbeat(ws);
        emit(this, "connected", { client: frame.client, user: frame.user });
        this._resubscribe();
        break;
    }
  }

  _startHeartbeat(ws) {
    // Browsers cannot send WebSocket pings: a request tells a dead path from a quiet one.
    clearInterval(this._heartbeat);
    if (!this.pingInterval) return;
    this._heartbeat = setInterval(() => {
      if (this._ws !== ws || Date.now() - this._lastFrame < this.pingInterval) return;
      this._sendWithin("ping", {}, this.requestTimeout).catch(() => {
        if (this._ws !== ws) return;
        this._drop(); // a dead path: do not wait for a close handshake that cannot happen
        ws.close(4000, "no reply to ping");
        this._closed(1006, true, 0);
      });
    }, this.pingInterval);
  }

  async _refresh() {
    try {
      const token = await this._token("refresh");
      if (token) await this._send("auth", { token });
    } catch (error) {
      // The server closes with 4003 at expiry; we reconnect then (with a fresh token).
      console.warn("roomcast: token refresh failed:", error);
    }
  }

  async _resubscribe() {
    const ws = this._ws;
    const subs = [...this.subscriptions.values()].filter((sub) => sub._sentOn !== this.connections);
    const outcomes = await Promise.allSettled(subs.map((sub) => this._subscribeOn(sub)));
    if (this._ws !== ws || !this._live) return; // dropped meanwhile: the next connection retries
    outcomes.forEach((outcome, i) => {
      const error = outcome.reason;
      if (outcome.status === "rejected" && !LOST.has(error.code)) {
        console.warn(`roomcast: subscribing to ${subs[i].channel} failed:`, error);
        this.subscriptions.delete(subs[i].channel);
        subs[i]._end(error);
      }
    });
    this._setState("connected");
  }

  /** Subscribe `sub` on the current connection (with recovery); retries `unavailable`. */
  async _subscribeOn(sub) {
    const serial = this.connections;
    sub._sentOn = serial;
    for (let attempt = 1; ; attempt += 1) {
      const body = { channel: sub.channel };
      if (sub.joinLeave) body.join_leave = true;
      if (sub.epoch !== null) body.recover = { offset: sub.offset, epoch: sub.epoch };
      try {
        return await this._send("subscribe", body, sub);
      } catch (error) {
        if (error.code !== "unavailable") throw error;
      }
      await new Promise((resolve) => setTimeout(resolve, this._backoff(attempt)));
      if (this.connections !== serial || !this._live || !sub.active) {
        throw new RoomcastError("connection_lost", "the connection dropped");
      }
    }
  }

  // -- requests -----------------------------------------------------------------------------

  _send(op, body, sub = null) {
    const ws = this._ws;
    if (!ws || !this._live) return Promise.reject(new RoomcastError("not_connected", "offline"));
    const id = ++this._ids;
    return new Promise((resolve, reject) => {
      this._waiting.set(id, { resolve, reject, sub });
      ws.send(JSON.stringify({ id, op, ...body }));
    });
  }

  /** _send, rejected with a "timeout" error after `ms`. */
  async _sendWithin(op, body, ms) {
    let timer;
    const timeout = new Promise((_, reject) => {
      const error = new RoomcastError("timeout", `no reply to ${op} in time`);
      timer = setTimeout(() => reject(error), ms);
    });
    try {
      return await Promise.race([this._send(op, body), timeout]);
    } finally {
      clearTimeout(timer);
    }
  }

  /**
   * Send one request once connected and return its result (rejects with a RoomcastError).
   * A request made while reconnecting waits (up to requestTimeout) and is sent once connected.
   */
  async request(op, body = {}) {
    const deadline = Date.now() + this.requestTimeout;
    for (;;) {
      if (this.state === "closed") {
        throw this.error || new RoomcastError("closed", "the client was closed");
      }
      await this._until(() => this.state === "connected", Math.max(0, deadline - Date.now()));
      try {
        return await this._sendWithin(op, body, Math.max(0, deadline - Date.now()));
      } catch (error) {
        if (error.code !== "not_connected") throw error;
      }
    }
  }

  /** Subscribe to `channel`; returns the Subscription at once (await sub.ready()). */
  subscribe(channel, { joinLeave = false } = {}) {
    if (this.subscriptions.has(channel)) {
      throw new RoomcastError("already_subscribed", `already subscribed to ${channel}`);
    }
    const sub = new Subscription(this, channel, joinLeave);
    if (this.state === "closed") {
      sub._end(this.error || new RoomcastError("closed", "the client was closed"));
      return sub;
    }
    this.subscriptions.set(channel, sub);
    if (this._live) {
      this._subscribeOn(sub).catch((error) => {
        if (LOST.has(error.code) || this.subscriptions.get(channel) !== sub) return;
        this.subscriptions.delete(channel);
        sub._end(error);
      });
    }
    // Otherwise the next `connected` push subscribes it.
    return sub;
  }

  async _unsubscribe(sub) {
    if (this.subscriptions.get(sub.channel) !== sub) return;
    this.subscriptions.delete(sub.channel);
    sub._end(null);
    if (this._live) await this._send("unsubscribe", { channel: sub.channel }).catch(() => {});
  }

  /** Publish `data` (any JSON value) to `channel`; resolves to its offset. */
  async publish(channel, data) {
    return (await this.request("publish", { channel, data })).offset;
  }

  /** Who is subscribed to `channel`: [{client, user, connected_at}, ...]. */
  async presence(channel) {
    return (await this.request("presence", { channel })).clients;
  }

  /** Stored publications: {epoch, offset, start, publications} (see docs/protocol.md). */
  async history(channel, { limit, before, since } = {}) {
    const body = { channel };
    if (limit !== undefined) body.limit = limit;
    if (before !== undefined) body.before = before;
    if (since !== undefined) body.since = since;
    return this.request("history", body);
  }

  /** One application-level round trip. */
  async ping() {
    await this.request("ping");
  }
}

/** A client for the /ws endpoint at `url` (see docs/browser.md for the options). */
export function connect(url, options = {}) {
  return new Client(url, options);
}
