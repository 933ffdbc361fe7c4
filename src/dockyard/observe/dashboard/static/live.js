/* Dockyard dashboard: the live parts. Every element with data-live="URL" opens one
   EventSource; the server sends "replace" and "append" events whose JSON names a target
   element id and carries HTML it rendered and escaped itself. With data-live-toggle="ID"
   the stream only runs while that checkbox is checked. Pages read fine without this. */
(function () {
  "use strict";
  var MAX_ROWS = 2000;

  function setStatus(holder, text, state) {
    var id = holder.getAttribute("data-live-status");
    var status = id && document.getElementById(id);
    holder.setAttribute("data-live-state", state);
    if (status) {
      status.textContent = text;
      status.setAttribute("data-state", state);
    }
  }

  function nearBottom(box) {
    return box.scrollHeight - box.scrollTop - box.clientHeight < 40;
  }

  function apply(kind, event) {
    var message = JSON.parse(event.data);
    var target = document.getElementById(message.target);
    if (!target) { return; }
    if (kind === "replace") {
      // Keep keyboard focus on the same link across the update.
      var focused = document.activeElement;
      var href = focused && target.contains(focused) ? focused.getAttribute("href") : null;
      target.innerHTML = message.html;
      if (href) {
        var again = target.querySelector('a[href="' + CSS.escape(href) + '"]');
        if (again) { again.focus(); }
      }
      return;
    }
    var box = target.closest(".log-wrap");
    var stick = box ? nearBottom(box) : false;
    var empty = target.querySelectorAll(".empty-row");
    for (var i = 0; i < empty.length; i++) { empty[i].remove(); }
    target.insertAdjacentHTML("beforeend", message.html);
    while (target.rows.length > MAX_ROWS) { target.deleteRow(0); }
    if (box && stick) { box.scrollTop = box.scrollHeight; }
  }

  /* The stream URL, told to catch up after the newest log row already on the page, so a
     reconnect neither repeats nor skips lines. */
  function streamUrl(holder) {
    var url = new URL(holder.getAttribute("data-live"), window.location.href);
    var rows = holder.querySelectorAll("tr[data-t]");
    if (rows.length) { url.searchParams.set("after", rows[rows.length - 1].getAttribute("data-t")); }
    return url.toString();
  }

  function start(holder) {
    var live = { source: null, timer: null };
    function open() {
      live.timer = null;
      var source = new EventSource(streamUrl(holder));
      live.source = source;
      setStatus(holder, "Connecting…", "connecting");
      source.addEventListener("open", function () { setStatus(holder, "Live", "open"); });
      source.addEventListener("error", function () {
        source.close();
        setStatus(holder, "Reconnecting…", "reconnecting");
        live.timer = window.setTimeout(open, 3000);
      });
      source.addEventListener("replace", function (e) { apply("replace", e); });
      source.addEventListener("append", function (e) { apply("append", e); });
    }
    open();
    return {
      close: function () {
        if (live.timer !== null) { window.clearTimeout(live.timer); }
        if (live.source) { live.source.close(); }
      }
    };
  }

  function wire(holder) {
    var toggleId = holder.getAttribute("data-live-toggle");
    var toggle = toggleId && document.getElementById(toggleId);
    if (!toggle) { start(holder); return; }
    var source = null;
    function sync() {
      if (toggle.checked && !source) {
        source = start(holder);
      } else if (!toggle.checked && source) {
        source.close();
        source = null;
        setStatus(holder, "Live tail off", "off");
      }
    }
    toggle.addEventListener("change", sync);
    sync();
    if (!toggle.checked) { setStatus(holder, "Live tail off", "off"); }
  }

  function boot() {
    var boxes = document.querySelectorAll(".log-wrap");
    for (var i = 0; i < boxes.length; i++) { boxes[i].scrollTop = boxes[i].scrollHeight; }
    var holders = document.querySelectorAll("[data-live]");
    for (var j = 0; j < holders.length; j++) { wire(holders[j]); }
  }

  if (document.readyState === "loading") {
    document.addEventListener("DOMContentLoaded", boot);
  } else {
    boot();
  }
})();
