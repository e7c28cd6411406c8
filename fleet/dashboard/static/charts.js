// Draws the device page's charts with uPlot (vendored, MIT) from the JSON the server embedded.
(function () {
  "use strict";
  function draw() {
    var el = document.getElementById("series");
    if (!el || typeof uPlot === "undefined") { return; }
    var data = JSON.parse(el.textContent);
    var colors = ["#0969da", "#cf222e", "#8250df", "#1a7f37"];
    document.querySelectorAll(".chart").forEach(function (box) {
      var names = box.dataset.series.split(",");
      var series = [{}];
      var columns = [data.ts];
      names.forEach(function (n, i) {
        series.push({label: n + " (" + box.dataset.unit + ")", stroke: colors[i % colors.length], width: 2});
        columns.push(data[n]);
      });
      new uPlot({width: Math.max(320, box.clientWidth || 800), height: 200, series: series}, columns, box);
    });
  }
  if (document.readyState === "loading") { document.addEventListener("DOMContentLoaded", draw); } else { draw(); }
})();
