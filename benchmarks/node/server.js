// The guide's /ws/echo and /ws/chat on Node's ws library (roomcast's benchmark, "node" column).
// Usage: node server.js --port PORT   (or PORT=...); listens on 127.0.0.1 only.
'use strict';
const http = require('http');
const { WebSocketServer, WebSocket } = require('ws');

const argIndex = process.argv.indexOf('--port');
const port = Number(argIndex > 0 ? process.argv[argIndex + 1] : process.env.PORT || 8000);

const server = http.createServer((req, res) => {
  const ok = req.method === 'GET' && req.url === '/health';
  res.writeHead(ok ? 200 : 404, { 'content-type': 'application/json' });
  res.end(ok ? '{"status":"ok"}' : '{"detail":"Not Found"}');
});
const echo = new WebSocketServer({ noServer: true, perMessageDeflate: false });
const chat = new WebSocketServer({ noServer: true, perMessageDeflate: false });

echo.on('connection', (ws) => {
  ws.on('message', (data, isBinary) => { if (!isBinary) ws.send(`Echo: ${data}`); });
});

function broadcast(text) {
  for (const member of chat.clients) {
    if (member.readyState === WebSocket.OPEN) member.send(text);
  }
}
chat.on('connection', (ws) => {
  ws.on('message', (data, isBinary) => { if (!isBinary) broadcast(`Client says: ${data}`); });
  ws.on('close', () => broadcast('A client left the chat'));
});

server.on('upgrade', (req, socket, head) => {
  const wss = req.url === '/ws/echo' ? echo : req.url === '/ws/chat' ? chat : null;
  if (wss === null) { socket.destroy(); return; }
  wss.handleUpgrade(req, socket, head, (ws) => wss.emit('connection', ws, req));
});
server.listen(port, '127.0.0.1');
