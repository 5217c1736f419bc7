/*! forwarder ui-logger.js: browser errors to the forwarder's POST /logs/ingest.
 *
 * Plain ES2017, no build step, no dependencies. Served by the daemon at /ui-logger.js.
 *
 *   <script src="/ui-logger.js"></script>
 *   <script>
 *     ForwarderLogger.init({
 *       endpoint: '/logs/ingest',     // default
 *       token: 'ingest-token',        // optional: sent as "Authorization: Bearer <token>"
 *       batchSize: 20,                // a batch is sent as soon as this many reports wait
 *       flushIntervalMs: 2000,        // ... or this long after the first one was queued
 *       maxQueue: 200,                // oldest reports are dropped beyond this (and counted)
 *       retryBaseMs: 1000,            // first retry delay after a failed send (then doubles)
 *       captureConsole: true,         // report console.error calls
 *       meta: function () { return {release: '1.4.2', route: router.current}; }
 *     });
 *     ForwarderLogger.setUser(currentUser.id);   // null to clear
 *   </script>
 *
 * Captured: uncaught errors (window "error" event: message, source, line, col, stack),
 * unhandled promise rejections (reason and stack) and console.error calls (arguments
 * formatted like the console does, the caller's stack; the original console.error is
 * still called). Each report is
 *   {level: "ERROR", event: "ui.error" | "ui.unhandledrejection" | "ui.console_error",
 *    message, ts (ISO 8601), meta: {url, stack, user_agent, user_id, ...}}
 * with the app's meta() fields added (the logger's own fields win on a clash).
 * Also: ForwarderLogger.captureException(error, meta?) for caught errors (event
 * "ui.error", meta.handled = true), ForwarderLogger.log(level, event, message, meta?),
 * ForwarderLogger.flush() and ForwarderLogger.stats().
 *
 * Delivery: a JSON array per batch through fetch (keepalive, application/json). A batch
 * that fails with a network error, 408, 429 or 5xx is retried (at most 3 attempts, with
 * a growing delay, honouring Retry-After); other refusals drop it. When the page is
 * hidden or left (visibilitychange, pagehide) what is queued goes with
 * navigator.sendBeacon (a Blob of type application/json); with a token, which a beacon
 * cannot carry as a header, with a keepalive fetch instead. Identical consecutive
 * reports still waiting in the queue are folded into one with meta.repeat_count. Reports
 * dropped (queue full, or given up) are counted in meta.dropped_count of the first
 * report of the next batch.
 *
 * Safety: every entry point catches its own errors and never throws into the page; the
 * logger never calls console.error itself, and a report made while the logger is
 * already working (from the app's meta() function, say) is ignored, so it cannot
 * recurse on its own failures.
 */
(function (root) {
  'use strict';

  if (!root || (root.ForwarderLogger && root.ForwarderLogger.version)) {
    return; // loaded twice: keep the first instance (and its queue)
  }

  var VERSION = '1.0.0';
  var MAX_BODY_BYTES = 60000; // Chromium allows 64 KiB in flight for beacons and keepalive
  var MAX_MESSAGE_CHARS = 2000;
  var MAX_STACK_CHARS = 8000;
  var MAX_ATTEMPTS = 3;
  var MAX_RETRY_DELAY_MS = 60000;
  var LEVELS = {INFO: 'INFO', WARNING: 'WARNING', ERROR: 'ERROR', WARN: 'WARNING',
    DEBUG: 'INFO', TRACE: 'INFO', LOG: 'INFO', FATAL: 'ERROR', CRITICAL: 'ERROR'};

  var config = {
    endpoint: '/logs/ingest',
    token: null,
    batchSize: 20,
    flushIntervalMs: 2000,
    maxQueue: 200,
    retryBaseMs: 1000,
    captureConsole: true,
    meta: null
  };

  var queue = [];          // items {report, attempts}, oldest first
  var inFlight = null;     // the batch a fetch is sending, or null
  var timer = null;
  var failures = 0;        // consecutive failed sends
  var retryAt = 0;         // no regular send before this time (ms since epoch)
  var pendingDrops = 0;    // dropped since the last batch that carried the count
  var counters = {captured: 0, sent: 0, dropped: 0, failed_sends: 0};
  var userId = null;
  var started = false;
  var busy = false;        // true while the logger builds a report: nested reports are ignored
  var scriptUrl = '';

  try {
    if (root.document && root.document.currentScript) {
      scriptUrl = root.document.currentScript.src || '';
    }
  } catch (e) { /* no script url: stacks keep the logger's frame */ }

  function noop() {}

  // Every function the page or the browser can call goes through this.
  function guarded(fn) {
    return function () {
      try {
        return fn.apply(this, arguments);
      } catch (e) {
        return undefined; // swallowed: the logger never throws into the page
      }
    };
  }

  // -- building reports ----------------------------------------------------------------

  function isErrorLike(value) {
    return !!value && typeof value === 'object' &&
      typeof value.message === 'string' && typeof value.name === 'string';
  }

  function describe(value) {
    try {
      if (typeof value === 'string') return value;
      if (isErrorLike(value)) return value.message ? value.name + ': ' + value.message : value.name;
      if (value === undefined) return 'undefined';
      if (value !== null && typeof value === 'object') {
        try {
          var json = JSON.stringify(value);
          if (json !== undefined) return json;
        } catch (e) { /* a cycle, a BigInt: fall back to String() */ }
      }
      return String(value);
    } catch (e) {
      return '[unprintable value]';
    }
  }

  function stackOf(value) {
    try {
      return value && typeof value.stack === 'string' ? value.stack : '';
    } catch (e) {
      return '';
    }
  }

  function clip(text, limit) {
    return text.length > limit ? text.slice(0, limit) + '... [truncated]' : text;
  }

  // console.error's arguments as the console shows them: "%s"-style substitutions first.
  function formatArgs(args) {
    var parts = [];
    var next = 0;
    if (typeof args[0] === 'string' && args.length > 1 && /%[sdifoOc]/.test(args[0])) {
      next = 1;
      parts.push(args[0].replace(/%[sdifoOc]/g, function (spec) {
        if (next >= args.length) return spec;
        var arg = args[next++];
        var kind = spec.charAt(1);
        if (kind === 'c') return '';
        if (kind === 'd' || kind === 'i') return String(parseInt(arg, 10));
        if (kind === 'f') return String(parseFloat(arg));
        return describe(arg);
      }));
    }
    for (; next < args.length; next++) parts.push(describe(args[next]));
    return parts.join(' ');
  }

  // Where console.error was called from: a fresh stack without the logger's own frames.
  function callerStack() {
    var stack = stackOf(new Error('console.error'));
    var lines = stack.split('\n');
    var kept = [];
    for (var i = 0; i < lines.length; i++) {
      var line = lines[i];
      if (i === 0 && line.indexOf('Error: console.error') === 0) continue;
      if (scriptUrl && line.indexOf(scriptUrl) >= 0) continue;
      kept.push(line);
    }
    return kept.join('\n');
  }

  function jsonSafe(meta) {
    try {
      return JSON.parse(JSON.stringify(meta)); // a snapshot: later changes by the app don't leak in
    } catch (e) {
      var safe = {};
      Object.keys(meta).forEach(function (key) {
        try {
          var json = JSON.stringify(meta[key]);
          safe[key] = json === undefined ? describe(meta[key]) : JSON.parse(json);
        } catch (err) {
          safe[key] = describe(meta[key]);
        }
      });
      return safe;
    }
  }

  function currentUrl() {
    try {
      return String(root.location.href);
    } catch (e) {
      return '';
    }
  }

  function build(level, event, message, stack, extra) {
    var meta = {};
    if (typeof config.meta === 'function') {
      try {
        var own = config.meta();
        if (own && typeof own === 'object') Object.assign(meta, own);
      } catch (e) {
        meta.meta_error = describe(e);
      }
    }
    if (extra) Object.assign(meta, extra);
    meta.url = currentUrl();
    if (stack) meta.stack = clip(stack, MAX_STACK_CHARS);
    try {
      meta.user_agent = String(root.navigator.userAgent);
    } catch (e) { /* no navigator */ }
    if (userId !== null) meta.user_id = userId;
    return {
      level: level,
      event: event,
      message: clip(String(message), MAX_MESSAGE_CHARS),
      ts: new Date().toISOString(),
      meta: jsonSafe(meta)
    };
  }

  function capture(level, event, message, stack, extra) {
    if (!started || busy) return;
    busy = true;
    try {
      enqueue(build(level, event, message, stack, extra));
    } catch (e) {
      /* swallowed */
    } finally {
      busy = false;
    }
  }

  // -- the queue -----------------------------------------------------------------------

  function sameReport(a, b) {
    return a.event === b.event && a.message === b.message && a.meta.stack === b.meta.stack &&
      a.meta.url === b.meta.url && a.meta.user_id === b.meta.user_id;
  }

  function enqueue(report) {
    counters.captured++;
    var last = queue.length ? queue[queue.length - 1].report : null;
    if (last && sameReport(last, report)) {
      last.meta.repeat_count = (last.meta.repeat_count || 1) + 1;
      return;
    }
    queue.push({report: report, attempts: 0});
    trim();
    schedule();
  }

  // A report is lost for good: count it, with the drops it was carrying to the server.
  function lose(item) {
    pendingDrops += 1 + (item.report.meta.dropped_count || 0);
    counters.dropped += 1;
  }

  function trim() {
    while (queue.length > config.maxQueue) {
      lose(queue.shift());
    }
  }

  function schedule() {
    if (inFlight || !queue.length) return;
    var now = Date.now();
    var wait;
    if (now < retryAt) wait = retryAt - now;
    else wait = queue.length >= config.batchSize ? 0 : config.flushIntervalMs;
    if (timer !== null) {
      if (wait > 0) return; // a send is already planned
      clearTimeout(timer);
    }
    timer = setTimeout(onTimer, wait);
  }

  var onTimer = guarded(function () {
    timer = null;
    send();
  });

  function byteLength(text) {
    try {
      return new TextEncoder().encode(text).length;
    } catch (e) {
      return text.length * 3;
    }
  }

  // Takes the next batch off the queue: at most batchSize reports and (but for a single
  // report) MAX_BODY_BYTES of JSON. The drop count rides on its first report.
  function takeBatch() {
    if (pendingDrops > 0) {
      var first = queue[0].report;
      first.meta.dropped_count = (first.meta.dropped_count || 0) + pendingDrops;
      pendingDrops = 0;
    }
    var items = [];
    var parts = [];
    var size = 2;
    while (queue.length && items.length < config.batchSize) {
      var json = JSON.stringify(queue[0].report);
      var bytes = byteLength(json) + 1;
      if (items.length && size + bytes > MAX_BODY_BYTES) break;
      items.push(queue.shift());
      parts.push(json);
      size += bytes;
    }
    return {items: items, body: '[' + parts.join(',') + ']', bytes: size};
  }

  function headers() {
    var h = {'Content-Type': 'application/json'};
    if (config.token) h.Authorization = 'Bearer ' + config.token;
    return h;
  }

  function send() {
    if (inFlight || !queue.length) return;
    if (typeof root.fetch !== 'function') return;
    var batch = takeBatch();
    inFlight = batch.items;
    var request;
    try {
      request = root.fetch(config.endpoint, {
        method: 'POST',
        headers: headers(),
        body: batch.body,
        keepalive: batch.bytes <= MAX_BODY_BYTES,
        credentials: 'same-origin'
      });
    } catch (e) {
      request = Promise.reject(e);
    }
    request.then(
      guarded(function (response) {
        finish(batch.items, response.status, response.headers.get('Retry-After'));
      }),
      guarded(function () {
        finish(batch.items, 0, null);
      })
    ).catch(noop);
  }

  function finish(items, status, retryAfter) {
    inFlight = null;
    if (status >= 200 && status < 300) {
      counters.sent += items.length;
      failures = 0;
      retryAt = 0;
    } else {
      counters.failed_sends++;
      failures++;
      var retryable = status === 0 || status === 408 || status === 429 || status >= 500;
      var kept = [];
      items.forEach(function (item) {
        item.attempts++;
        if (retryable && item.attempts < MAX_ATTEMPTS) kept.push(item);
        else lose(item);
      });
      queue = kept.concat(queue);
      trim();
      var delay = Math.min(config.retryBaseMs * Math.pow(2, failures), MAX_RETRY_DELAY_MS);
      var seconds = parseInt(retryAfter, 10);
      if (seconds > 0) delay = Math.max(delay, Math.min(seconds * 1000, 5 * MAX_RETRY_DELAY_MS));
      retryAt = Date.now() + delay;
    }
    schedule();
  }

  // The page is going away or hidden: hand everything queued to the browser now.
  function flushForExit() {
    if (timer !== null) {
      clearTimeout(timer);
      timer = null;
    }
    while (queue.length) {
      var batch = takeBatch();
      if (!beacon(batch)) {
        queue = batch.items.concat(queue); // over the browser's quota: keep for a return
        break;
      }
      counters.sent += batch.items.length;
    }
  }

  function beacon(batch) {
    var nav = root.navigator;
    if (!config.token && nav && typeof nav.sendBeacon === 'function' && typeof Blob === 'function') {
      try {
        if (nav.sendBeacon(config.endpoint, new Blob([batch.body], {type: 'application/json'}))) {
          return true;
        }
      } catch (e) { /* refused (cross-origin type, ...): try a keepalive fetch */ }
    }
    if (typeof root.fetch !== 'function') return false;
    try {
      root.fetch(config.endpoint, {
        method: 'POST', headers: headers(), body: batch.body, keepalive: true,
        credentials: 'same-origin'
      }).then(noop, guarded(function () {
        // Not delivered: if the page comes back (bfcache), send it again later.
        queue = batch.items.concat(queue);
        counters.sent -= batch.items.length;
        trim();
      })).catch(noop);
      return true;
    } catch (e) {
      return false;
    }
  }

  // -- capture -------------------------------------------------------------------------

  var onError = guarded(function (ev) {
    if (!ev || (ev.target && ev.target !== root && ev.target.nodeType)) return; // resource
    var err = ev.error;
    var extra = {};
    if (ev.filename) extra.source = String(ev.filename);
    if (ev.lineno) extra.line = ev.lineno;
    if (ev.colno) extra.col = ev.colno;
    if (isErrorLike(err)) extra.error_name = err.name;
    var message = isErrorLike(err) ? describe(err) : String(ev.message || 'Script error.');
    capture('ERROR', 'ui.error', message, stackOf(err), extra);
  });

  var onRejection = guarded(function (ev) {
    var reason = ev ? ev.reason : undefined;
    var extra = isErrorLike(reason) ? {error_name: reason.name} : null;
    capture('ERROR', 'ui.unhandledrejection', describe(reason), stackOf(reason), extra);
  });

  var onPageHide = guarded(flushForExit);

  var onVisibility = guarded(function () {
    if (root.document.visibilityState === 'hidden') flushForExit();
  });

  function patchConsole() {
    var console = root.console;
    if (!console || typeof console.error !== 'function') return;
    var original = console.error;
    var patched = function () {
      var args = arguments;
      if (!busy) {
        try {
          capture('ERROR', 'ui.console_error', formatArgs(args), findStack(args), null);
        } catch (e) { /* swallowed */ }
      }
      return original.apply(this, args); // exactly what the page would get without us
    };
    patched.forwarderOriginal = original;
    console.error = patched;
  }

  function findStack(args) {
    for (var i = 0; i < args.length; i++) {
      var stack = stackOf(args[i]);
      if (stack && isErrorLike(args[i])) return stack;
    }
    return callerStack();
  }

  // -- the API -------------------------------------------------------------------------

  function positive(value, fallback) {
    var n = Number(value);
    return isFinite(n) && n > 0 ? Math.floor(n) : fallback;
  }

  var api = {
    version: VERSION,

    init: guarded(function (options) {
      var o = options || {};
      if (typeof o.endpoint === 'string' && o.endpoint) config.endpoint = o.endpoint;
      if (o.token !== undefined) config.token = o.token ? String(o.token) : null;
      config.batchSize = positive(o.batchSize, config.batchSize);
      config.flushIntervalMs = positive(o.flushIntervalMs, config.flushIntervalMs);
      config.maxQueue = positive(o.maxQueue, config.maxQueue);
      config.retryBaseMs = positive(o.retryBaseMs, config.retryBaseMs);
      if (o.meta !== undefined) config.meta = typeof o.meta === 'function' ? o.meta : null;
      if (o.captureConsole !== undefined) config.captureConsole = !!o.captureConsole;
      if (!started) {
        started = true;
        root.addEventListener('error', onError);
        root.addEventListener('unhandledrejection', onRejection);
        root.addEventListener('pagehide', onPageHide);
        if (root.document) root.document.addEventListener('visibilitychange', onVisibility);
        if (config.captureConsole) patchConsole();
      }
      trim();
      return api;
    }),

    setUser: guarded(function (id) {
      userId = id === null || id === undefined || id === '' ? null
        : (typeof id === 'number' ? id : String(id));
    }),

    captureException: guarded(function (error, meta) {
      var extra = Object.assign({}, meta && typeof meta === 'object' ? meta : {}, {handled: true});
      if (isErrorLike(error)) extra.error_name = error.name;
      capture('ERROR', 'ui.error', describe(error), stackOf(error), extra);
    }),

    log: guarded(function (level, event, message, meta) {
      var lvl = LEVELS[String(level).toUpperCase()] || 'INFO';
      var extra = meta && typeof meta === 'object' ? Object.assign({}, meta) : null;
      capture(lvl, String(event || 'ui.log'), describe(message), '', extra);
    }),

    flush: guarded(function () {
      if (timer !== null) {
        clearTimeout(timer);
        timer = null;
      }
      if (Date.now() >= retryAt) send();
      else schedule();
    }),

    stats: guarded(function () {
      return {
        queued: queue.length,
        in_flight: inFlight ? inFlight.length : 0,
        captured: counters.captured,
        sent: counters.sent,
        dropped: counters.dropped,
        failed_sends: counters.failed_sends
      };
    })
  };

  root.ForwarderLogger = api;
})(typeof window !== 'undefined' ? window : undefined);
