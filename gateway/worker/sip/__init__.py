"""The SIP leg: the only pjsua2 code of a worker."""
