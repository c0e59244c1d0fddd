// Conduit's dashboard, the only script it has: every 2 s, fetch this page's live part (rendered by
// the server) and swap it in; ask before an action that has data-confirm. No library, no build.
(function () {
  "use strict";
  const live = document.getElementById("live");
  const note = document.getElementById("live-note");
  let busy = false;

  async function refresh() {
    const selected = String(window.getSelection() || "");
    if (!live || busy || document.hidden || selected) return; // never while someone copies text
    busy = true;
    try {
      const answer = await fetch(location.href, {
        headers: { "X-Conduit-Live": "1" },
        credentials: "same-origin",
        cache: "no-store",
      });
      if (answer.ok) {
        live.innerHTML = await answer.text();
        note.textContent = "refreshes every 2 s";
      } else {
        note.textContent = "refresh failed: HTTP " + answer.status;
      }
    } catch (error) {
      note.textContent = "refresh failed: dashboard unreachable";
    } finally {
      busy = false;
    }
  }

  setInterval(refresh, 2000);
  document.addEventListener("submit", function (event) {
    const question = event.target.dataset.confirm;
    if (question && !window.confirm(question)) event.preventDefault();
  });
})();
