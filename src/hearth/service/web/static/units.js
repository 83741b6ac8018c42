/* Live device state for the "Your devices" and device pages (progressive enhancement:
   without JavaScript the pages still work and have a Refresh link). Same-origin fetch of
   /units/state.json every few seconds; text only (textContent), never HTML. */
(function () {
  "use strict";
  var cards = document.querySelectorAll("[data-device]");
  if (!cards.length || !window.fetch) { return; }
  var EVERY_MS = 3000;

  function update(unit) {
    var card = document.querySelector('[data-device="' + unit.device_id + '"]');
    if (!card) { return true; }
    var online = card.querySelector('[data-field="online"]');
    if (online) { online.textContent = unit.online ? "online" : "offline"; }
    var at = card.querySelector('[data-field="state_at"]');
    if (at && unit.state_at) {
      at.textContent = unit.state_at.replace("T", " ").slice(0, 16) + " UTC";
    }
    var missing = false;
    unit.readings.forEach(function (r) {
      var cell = card.querySelector('[data-reading="' + r.name + '"]');
      if (!cell) { missing = true; return; }
      cell.textContent = r.text + (r.unit ? " " + r.unit : "");
    });
    return !missing;
  }

  function tick() {
    fetch("/units/state.json", { credentials: "same-origin", cache: "no-store" })
      .then(function (resp) { return resp.ok ? resp.json() : null; })
      .then(function (data) {
        if (!data) { return; }
        var complete = true;
        data.units.forEach(function (u) { complete = update(u) && complete; });
        if (!complete) { window.location.reload(); return; }
        document.documentElement.setAttribute("data-live", String(Date.now()));
      })
      .catch(function () { /* offline for a moment: try again next tick */ })
      .then(function () { window.setTimeout(tick, EVERY_MS); });
  }
  window.setTimeout(tick, EVERY_MS);
}());
