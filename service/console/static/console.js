// studiohook console: swaps in the HTML fragments the server pushes over server-sent events.
// Every element with data-live="URL" is refreshed from that stream. The page works without
// this script; it only keeps the figures moving without a reload.
"use strict";

function keepPlayingVideos(oldRoot, newRoot) {
  // A fragment that still shows the same video must not restart it.
  for (const fresh of newRoot.querySelectorAll("video[id]")) {
    const current = oldRoot.querySelector("#" + CSS.escape(fresh.id));
    if (current && current.getAttribute("src") === fresh.getAttribute("src")) {
      fresh.replaceWith(current);
    }
  }
}

function swap(target, html) {
  const focusedId = document.activeElement && target.contains(document.activeElement)
    ? document.activeElement.id : null;
  const holder = document.createElement(target.tagName === "TBODY" ? "tbody" : "div");
  if (target.tagName === "TBODY") {
    const table = document.createElement("table");
    table.appendChild(holder);
  }
  holder.innerHTML = html;
  keepPlayingVideos(target, holder);
  target.replaceChildren(...holder.childNodes);
  if (focusedId) {
    const again = document.getElementById(focusedId);
    if (again) again.focus();
  }
  target.dataset.updates = String(Number(target.dataset.updates || "0") + 1);
}

function follow(target) {
  const source = new EventSource(target.dataset.live);
  source.addEventListener("fragment", (message) => {
    target.classList.remove("stale");
    swap(target, message.data);
  });
  source.addEventListener("error", () => {
    // EventSource reconnects by itself; a closed stream (logged out, server gone) stays stale.
    target.classList.add("stale");
  });
}

document.addEventListener("DOMContentLoaded", () => {
  for (const target of document.querySelectorAll("[data-live]")) follow(target);
});
