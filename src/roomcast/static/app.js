// The chat page at /: guest sign-in, one room, messages, presence, history. See docs/browser.md.
import { connect } from "/static/roomcast.js";

const $ = (id) => document.querySelector(`[data-testid="${id}"]`);
const PAGE = 50; // messages per history page
const ROOM = /^[A-Za-z0-9_.-]{1,64}$/;

let chat = null; // the room we are in: {client, sub, room, ...}
const mine = new Set(); // the users this tab has been (own messages are marked)

// -- guest tokens -------------------------------------------------------------------------------

async function guest(body) {
  const reply = await fetch("/auth/guest", {
    method: "POST",
    headers: { "Content-Type": "application/json" },
    body: JSON.stringify(body),
  });
  if (!reply.ok) {
    const detail = await reply.json().catch(() => ({}));
    throw new Error(typeof detail.detail === "string" ? detail.detail : `HTTP ${reply.status}`);
  }
  const grant = await reply.json();
  sessionStorage.setItem("roomcast.grant", JSON.stringify(grant));
  mine.add(grant.user);
  return grant;
}

/** The token function of the client: reuse, renew when asked, sign in again when refused. */
function tokens(name) {
  let grant = JSON.parse(sessionStorage.getItem("roomcast.grant") || "null");
  if (grant) mine.add(grant.user);
  return async ({ reason }) => {
    const fresh = grant && grant.expires_at - Date.now() / 1000 > 60;
    if (!grant || (reason === "connect" && fresh)) {
      grant = grant || (await guest({ name }));
      return grant.token;
    }
    try {
      grant = await guest({ renew: grant.token });
    } catch {
      grant = await guest({ name }); // expired, or the server's guest key changed: a new guest
    }
    return grant.token;
  };
}

// -- the room -----------------------------------------------------------------------------------

function join(name, room) {
  const scheme = location.protocol === "https:" ? "wss" : "ws";
  const client = connect(`${scheme}://${location.host}/ws`, { token: tokens(name) });
  const sub = client.subscribe(`room:${room}`, { joinLeave: true });
  const current = { client, sub, room, people: new Map(), epochs: [], oldest: null, oldestEra: 0 };
  chat = window.roomcastChat = current; // (window's: for the console and the tests)
  showState(client.state);
  $("room-title").textContent = `#${room}`;
  $("messages").replaceChildren();
  $("presence").replaceChildren();
  $("send-error").textContent = "";
  $("join-form").hidden = true;
  $("chat").hidden = false;
  $("message").focus();

  // Events of a room we left (switched away from) are ignored.
  const on = (target, type, handler) =>
    target.addEventListener(type, (e) => chat === current && handler(e.detail));
  on(client, "state", ({ state, error }) => showState(state, error));
  on(client, "connected", ({ user }) => mine.add(user));
  on(sub, "publication", (pub) => addMessage(pub, pub.epoch));
  on(sub, "join", ({ info }) => {
    current.people.set(info.client, info.user);
    showPeople();
  });
  on(sub, "leave", ({ info }) => {
    current.people.delete(info.client);
    showPeople();
  });
  // Every (re)subscription: who is here now (we may have missed leaves while away).
  on(sub, "subscribed", () => loadPresence(current));
  on(sub, "end", ({ error }) => error && showError(`Left the room: ${error.message}`));
  sub.ready().then(() => loadEarlier(current, true), () => {});
}

/** Sign in first (so a refused name shows on the form), then join. */
async function start(name, room) {
  const stored = JSON.parse(sessionStorage.getItem("roomcast.grant") || "null");
  if (!stored || !stored.user.startsWith(`${name}#`)) {
    try {
      await guest({ name });
    } catch (error) {
      $("join-error").textContent = `Cannot sign in: ${error.message}`;
      $("join-form").hidden = false;
      return;
    }
  }
  $("join-error").textContent = "";
  location.hash = `room=${encodeURIComponent(room)}`;
  join(name, room);
}

function leave() {
  if (!chat) return;
  chat.client.close();
  chat = null;
  history.replaceState(null, "", location.pathname);
  $("chat").hidden = true;
  $("join-form").hidden = false;
  $("name").focus();
}

function showState(state, error) {
  const badge = $("state");
  badge.dataset.state = state;
  badge.textContent = state;
  if (state === "closed" && error) showError(`Disconnected: ${error.message}`);
}

function showError(text) {
  $("send-error").textContent = text;
}

async function loadPresence(current) {
  try {
    const clients = await current.client.presence(current.sub.channel);
    if (chat !== current) return;
    current.people = new Map(clients.map((c) => [c.client, c.user]));
    showPeople();
  } catch (error) {
    console.warn("presence:", error);
  }
}

function showPeople() {
  const users = [...new Set(chat.people.values())].sort((a, b) =>
    String(a).localeCompare(String(b)),
  );
  $("presence").replaceChildren(
    ...users.map((user) => {
      const li = document.createElement("li");
      li.dataset.user = user ?? "";
      appendName(li, user);
      if (mine.has(user)) li.classList.add("own");
      return li;
    }),
  );
  $("presence-count").textContent = `(${users.length})`;
}

/** A guest "ann#1a2b3c4d5e6f7a8b" shown as "ann" and a muted "#1a2b" (the whole id on hover). */
function appendName(parent, user) {
  const [name, tag] = user ? user.split("#") : ["anonymous"];
  const strong = document.createElement("strong");
  strong.textContent = name || user;
  parent.append(strong);
  if (tag) {
    const small = document.createElement("small");
    small.textContent = `#${tag.slice(0, 4)}`;
    small.title = user;
    parent.append(small);
  }
}

// -- messages -----------------------------------------------------------------------------------

/** Insert one publication in (epoch, offset) order, unless it is already shown. */
function addMessage(pub, epoch) {
  if (!chat.epochs.includes(epoch)) chat.epochs.push(epoch);
  const era = chat.epochs.indexOf(epoch);
  const list = $("messages");
  const key = `${epoch}:${pub.offset}`;
  if (list.querySelector(`[data-key="${CSS.escape(key)}"]`)) return;
  const scroller = $("messages-scroller");
  const atBottom = scroller.scrollHeight - scroller.scrollTop - scroller.clientHeight < 40;

  const li = document.createElement("li");
  li.dataset.key = key;
  li.dataset.era = era;
  li.dataset.offset = pub.offset;
  const user = pub.info ? pub.info.user : null;
  const own = user !== null && mine.has(user);
  li.dataset.own = own;
  if (own) li.classList.add("own");
  const head = document.createElement("div");
  head.className = "meta";
  const sender = document.createElement("span");
  sender.className = "sender";
  sender.dataset.testid = "sender";
  appendName(sender, user ?? (pub.info && pub.info.client ? null : "server"));
  head.append(sender);
  const ts = pub.data && typeof pub.data.ts === "number" ? new Date(pub.data.ts) : null;
  if (ts && !Number.isNaN(ts.getTime())) {
    const time = document.createElement("time");
    time.dateTime = ts.toISOString();
    time.textContent = ts.toLocaleTimeString([], { hour: "2-digit", minute: "2-digit" });
    head.append(time);
  }
  const text = document.createElement("p");
  text.dataset.testid = "text";
  text.textContent =
    pub.data && typeof pub.data.text === "string" ? pub.data.text : JSON.stringify(pub.data);
  li.append(head, text);

  // Newest last: walk back from the end (live messages land there at once).
  const later = (el) =>
    +el.dataset.era > era || (+el.dataset.era === era && +el.dataset.offset > pub.offset);
  let after = list.lastElementChild;
  while (after && later(after)) after = after.previousElementSibling;
  if (after) after.after(li);
  else list.prepend(li);
  // The oldest offset shown of the newest epoch: where the next page of history ends.
  if (chat.oldest === null || era > chat.oldestEra) {
    [chat.oldest, chat.oldestEra] = [pub.offset, era];
  } else if (era === chat.oldestEra) chat.oldest = Math.min(chat.oldest, pub.offset);
  if (atBottom || own) scroller.scrollTop = scroller.scrollHeight;
}

/** The page of history before the oldest message shown (the newest page at first). */
async function loadEarlier(current, first = false) {
  if (current.loading || (!first && !current.more)) return;
  current.loading = true;
  const scroller = $("messages-scroller");
  try {
    const options = { limit: PAGE };
    if (!first && current.oldest !== null) options.before = current.oldest;
    const page = await current.client.history(current.sub.channel, options);
    if (chat !== current || page.epoch !== current.sub.epoch) return;
    const height = scroller.scrollHeight;
    for (const pub of page.publications) addMessage(pub, page.epoch);
    if (first) scroller.scrollTop = scroller.scrollHeight;
    else scroller.scrollTop += scroller.scrollHeight - height; // keep what was on screen still
    const oldest = page.publications.length ? page.publications[0].offset : page.start;
    current.more = oldest > page.start;
    $("load-earlier").hidden = !current.more;
  } catch (error) {
    console.warn("history:", error);
  } finally {
    current.loading = false;
  }
  // Not enough to scroll yet: fetch more until it is (or nothing is left).
  if (chat === current && current.more && scroller.scrollHeight <= scroller.clientHeight) {
    loadEarlier(current);
  }
}

async function send(event) {
  event.preventDefault();
  const input = $("message");
  const text = input.value.trim();
  if (!text || !chat) return;
  input.value = "";
  showError("");
  try {
    await chat.client.publish(chat.sub.channel, { text, ts: Date.now() });
  } catch (error) {
    if (!input.value) input.value = text;
    showError(`Not sent: ${error.message}`);
  }
}

// -- wiring -------------------------------------------------------------------------------------

function roomFromHash() {
  const room = new URLSearchParams(location.hash.slice(1)).get("room");
  return room && ROOM.test(room) ? room : null;
}

$("join-form").addEventListener("submit", (event) => {
  event.preventDefault();
  const name = $("name").value.trim();
  localStorage.setItem("roomcast.name", name);
  start(name, $("room").value.trim());
});
$("composer").addEventListener("submit", send);
$("leave").addEventListener("click", leave);
$("load-earlier").addEventListener("click", () => chat && loadEarlier(chat));
$("messages-scroller").addEventListener("scroll", (event) => {
  if (chat && event.target.scrollTop < 40) loadEarlier(chat);
});
window.addEventListener("hashchange", () => {
  const room = roomFromHash();
  const name = localStorage.getItem("roomcast.name");
  if (!room || !name || (chat && chat.room === room)) return;
  if (chat) chat.client.close();
  chat = null;
  join(name, room);
});

const name = localStorage.getItem("roomcast.name");
if (name) $("name").value = name;
const room = roomFromHash();
if (room) $("room").value = room;
if (room && name) start(name, room); // a reload rejoins
else {
  $("join-form").hidden = false;
  $("name").focus();
}
