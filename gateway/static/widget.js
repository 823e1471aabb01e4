// sipgw click-to-call widget:
// <script src=".../widget.js" data-to="sales" data-token-url="/token" async></script>
// Renders a call button in a shadow root (no CSS leaks either way).
(() => {
  const script = document.currentScript;
  const base = new URL(".", script.src);
  const to = script.dataset.to;
  const tokenUrl = script.dataset.tokenUrl;
  const label = script.dataset.label || `Call ${to}`;
  const host = document.createElement("sipgw-call");
  script.after(host);
  const root = host.attachShadow({ mode: "open" });
  root.innerHTML = `<style>
    :host { all: initial; display: inline-block; font: 14px system-ui, sans-serif; }
    .box { display: flex; gap: 6px; align-items: center; }
    button { font: inherit; border: 0; border-radius: 18px; padding: 8px 14px; cursor: pointer;
             background: #1a7f37; color: #fff; }
    button.end { background: #cf222e; } button.mute { background: #57606a; }
    [hidden] { display: none; } .status { color: #57606a; }
  </style><div class="box"><button class="call"></button><span class="status" role="status"></span>
  <button class="mute" hidden>Mute</button><button class="end" hidden>Hang up</button></div>`;
  const $ = (sel) => root.querySelector(sel);
  $(".call").textContent = label;
  let gw = null, call = null;
  const show = (text, inCall) => {
    $(".status").textContent = text;
    host.dataset.state = text;
    $(".call").hidden = inCall; $(".end").hidden = !inCall; $(".mute").hidden = !inCall;
  };
  $(".call").onclick = async () => {
    show("calling…", true);
    try {
      const { SipGateway } = await import(new URL("sipgw.js", base).href);
      let token;
      if (tokenUrl) token = (await (await fetch(tokenUrl, { method: "POST" })).json()).token;
      gw = gw || await SipGateway.connect(new URL("ws", base).href.replace(/^http/, "ws"), { token });
      call = gw.call(to);
      call.on("ringing", () => show("ringing…", true));
      call.on("connected", () => show("in call", true));
      call.on("hangup", (h) => { show(`ended${h.reason ? ": " + h.reason : ""}`, false); call = null; });
    } catch (err) {
      show(`could not call: ${err.message}`, false);
    }
  };
  $(".end").onclick = () => call?.hangup();
  $(".mute").onclick = () => {
    if (!call) return;
    call.mute(!call.muted);
    $(".mute").textContent = call.muted ? "Unmute" : "Mute";
  };
  addEventListener("pagehide", () => { call?.hangup(); gw?.close(); });
})();
