"""The operator contract: what the core publishes and serves, and what consoles and widgets read.

One definition of every event kind, alarm kind, event payload and operator-API document, used by
the core (``sipis``), storage, the console and its widgets alike. Dependency-free on purpose: the
console process imports it without loading the core.

* :mod:`contract.kinds` — the enums (event kinds, alarm kinds, instance states, push outcomes);
* :mod:`contract.events` — one payload type per event kind, the event envelope, stream notices;
* :mod:`contract.documents` — rows and response documents of the operator API;
* :mod:`contract.codec` — JSON to and from those types (the wire shapes in docs/operator-api.md);
* :mod:`contract.query` — the instance query language (the API's ``q``, the console's filter).
"""
