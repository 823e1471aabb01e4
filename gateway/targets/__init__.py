"""The embedded SIP targets ``echo`` and ``tone``: a pjsua2 phone in its own process."""
