// The dashboard's own script: uPlot charts from data attributes, and the state of live updates.
// Loaded with a CSP nonce and Subresource Integrity; no inline script, no eval.
(function () {
  "use strict";
  var COLORS = ["#0b63c4", "#b3261e", "#1a7f37", "#8a5a00", "#7b3fc4"];

  function drawCharts(root) {
    var charts = root.querySelectorAll ? root.querySelectorAll("[data-chart]") : [];
    Array.prototype.forEach.call(charts, function (el) {
      if (el.getAttribute("data-drawn")) return;
      el.setAttribute("data-drawn", "1");
      var spec = JSON.parse(el.getAttribute("data-chart"));
      if (!spec.x.length) {
        el.textContent = spec.empty || "No data yet.";
        return;
      }
      var scales = { x: { time: spec.time !== false } };
      var axes = [{}];
      var series = [{ label: spec.xlabel || (spec.time === false ? "round" : "time") }];
      spec.series.forEach(function (s, i) {
        var scale = s.scale || "y";
        if (!scales[scale]) {
          scales[scale] = { auto: true };
          axes.push({ scale: scale, label: s.axis || s.label, side: axes.length === 1 ? 3 : 1 });
        }
        series.push({ label: s.label, scale: scale, stroke: COLORS[i % COLORS.length], width: 2 });
      });
      var data = [spec.x].concat(spec.series.map(function (s) { return s.values; }));
      // eslint-disable-next-line no-undef
      new uPlot({ width: Math.max(320, el.clientWidth || 640), height: 220, scales: scales, axes: axes, series: series }, data, el);
    });
  }

  function liveStatus(elt) {
    var live = elt && elt.closest ? elt.closest("[data-live]") : null;
    return live ? live.querySelector("[data-live-status]") : null;
  }

  function markStale(event, reason) {
    var status = liveStatus(event.detail.elt);
    if (!status) return;
    var since = status.getAttribute("data-updated") || "";
    status.setAttribute("data-stale", "true");
    status.textContent = "Live updates stopped (" + reason + "); the data below is from " + since + ".";
  }

  document.addEventListener("DOMContentLoaded", function () {
    drawCharts(document);
    var body = document.body;
    body.addEventListener("htmx:load", function (event) { drawCharts(event.detail.elt); });
    body.addEventListener("htmx:sendError", function (event) { markStale(event, "the controller did not answer"); });
    body.addEventListener("htmx:responseError", function (event) {
      markStale(event, "HTTP " + event.detail.xhr.status);
    });
    Array.prototype.forEach.call(document.querySelectorAll("[data-copy]"), function (button) {
      button.addEventListener("click", function () {
        var source = document.getElementById(button.getAttribute("data-copy"));
        if (source && navigator.clipboard) {
          navigator.clipboard.writeText(source.textContent.trim()).then(function () { button.textContent = "Copied"; });
        }
      });
    });
  });
})();
