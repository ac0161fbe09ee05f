"""The SIP layer (RFC 3261 and friends), our own: see README "Why our own SIP layer".

Its hot modules may run compiled; :data:`IMPLEMENTATION` says which form is in use.
"""

from sipis.sip._implementation import Implementation, install

IMPLEMENTATION: Implementation = install()  # before any of the modules it decides about
