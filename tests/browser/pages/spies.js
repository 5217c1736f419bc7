// Loaded BEFORE ui-logger.js: records what reaches the real console, every beacon the
// page sends, and every exception the page sees, so the test can check the logger's
// manners from outside. window.__loggerErrors collects exceptions the logger's API threw.
(function () {
  window.__consoleCalls = [];
  window.__beacons = [];
  window.__pageErrors = [];
  window.__loggerErrors = [];

  var originalError = console.error;
  console.error = function () {
    window.__consoleCalls.push(Array.prototype.map.call(arguments, function (a) {
      try { return String(a); } catch (e) { return '[unprintable]'; }
    }).join(' '));
    return originalError.apply(console, arguments);
  };

  var originalBeacon = navigator.sendBeacon.bind(navigator);
  navigator.sendBeacon = function (url, data) {
    window.__beacons.push({url: String(url), type: data && data.type !== undefined ? data.type : typeof data});
    return originalBeacon(url, data);
  };

  window.addEventListener('error', function (ev) {
    window.__pageErrors.push('error: ' + ev.message);
  });
  window.addEventListener('unhandledrejection', function (ev) {
    window.__pageErrors.push('rejection: ' + (ev.reason && ev.reason.message));
  });

  // Runs fn; an exception escaping the logger's API is a test failure, recorded here.
  window.step = function (name, fn) {
    try {
      return fn();
    } catch (e) {
      window.__loggerErrors.push(name + ': ' + e);
      return undefined;
    }
  };

  window.waitFor = function (condition, then) {
    var timer = setInterval(function () {
      if (condition()) {
        clearInterval(timer);
        then();
      }
    }, 20);
  };

  window.snapshot = function (phase) {
    return JSON.stringify({
      phase: phase,
      loggerErrors: window.__loggerErrors,
      pageErrors: window.__pageErrors,
      consoleCalls: window.__consoleCalls,
      beacons: window.__beacons,
      stats: window.ForwarderLogger ? window.ForwarderLogger.stats() : null
    });
  };

  window.postReport = function (phase) {
    return fetch('/report', {method: 'POST', body: window.snapshot(phase)});
  };
})();
