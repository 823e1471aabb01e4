#!/usr/bin/env python3
"""Standalone pjsua2 SIP caller used by the test harness.

Run as a subprocess, e.g.::

    python3 tests/peers/pjsua_caller.py --uri sip:x@127.0.0.1:5070 \
        --hangup-after 2 --tone 1000 --record out.wav

It makes ``--calls`` calls to ``--uri`` (all at once), optionally sends a tone
and records the received audio, and hangs up ``--hangup-after`` seconds after
each call was started (a call that is not answered by then is cancelled).

Every event is printed on stdout as one JSON object per line:

* ``{"event": "state", "call": i, "state": "CONFIRMED", "code": 200, ...}``
* ``{"event": "media", "call": i, "active": true}``
* ``{"event": "end", "call": i, "code": 486, "reason": "Busy Here",
  "local_hangup": false, "connected": false, "record": "out.wav"}``
* ``{"event": "done", "calls": n}`` when everything is finished.

All SIP and RTP sockets are bound to 127.0.0.1.  pjsua2 runs without worker
threads; everything happens in ``ep.libHandleEvents`` on the main thread.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time
from pathlib import Path

import pjsua2 as pj

STATE_NAMES = {
    pj.PJSIP_INV_STATE_NULL: "NULL",
    pj.PJSIP_INV_STATE_CALLING: "CALLING",
    pj.PJSIP_INV_STATE_INCOMING: "INCOMING",
    pj.PJSIP_INV_STATE_EARLY: "EARLY",
    pj.PJSIP_INV_STATE_CONNECTING: "CONNECTING",
    pj.PJSIP_INV_STATE_CONFIRMED: "CONFIRMED",
    pj.PJSIP_INV_STATE_DISCONNECTED: "DISCONNECTED",
}


def emit(**fields: object) -> None:
    sys.stdout.write(json.dumps(fields) + "\n")
    sys.stdout.flush()


class Caller(pj.Call):  # type: ignore[misc]
    """One outgoing call; the callbacks run inside ``libHandleEvents``."""

    def __init__(
        self, acc: pj.Account, index: int, tone: pj.ToneGenerator | None, record: str | None
    ) -> None:
        super().__init__(acc)
        self.index = index
        self.tone = tone
        self.record_path = record
        self.recorder: pj.AudioMediaRecorder | None = None
        self.started = time.monotonic()
        self.hangup_sent = False
        self.connected = False
        self.disconnected = False

    def onCallState(self, prm: pj.OnCallStateParam) -> None:
        ci = self.getInfo()
        emit(
            event="state",
            call=self.index,
            state=STATE_NAMES.get(ci.state, str(ci.state)),
            code=ci.lastStatusCode,
            reason=ci.lastReason,
        )
        if ci.state == pj.PJSIP_INV_STATE_CONFIRMED:
            self.connected = True
        if ci.state == pj.PJSIP_INV_STATE_DISCONNECTED:
            self.disconnected = True
            emit(
                event="end",
                call=self.index,
                code=ci.lastStatusCode,
                reason=ci.lastReason,
                local_hangup=self.hangup_sent,
                connected=self.connected,
                record=self.record_path if self.recorder is not None else None,
            )

    def onCallMediaState(self, prm: pj.OnCallMediaStateParam) -> None:
        ci = self.getInfo()
        for mi in ci.media:
            if mi.type != pj.PJMEDIA_TYPE_AUDIO or mi.status != pj.PJSUA_CALL_MEDIA_ACTIVE:
                continue
            # (Re)connect on every media update: a re-INVITE / UPDATE that
            # changes the codec recreates the stream and its conference slot.
            aud = self.getAudioMedia(mi.index)
            if self.tone is not None:
                self.tone.startTransmit(aud)
            if self.record_path:
                if self.recorder is None:
                    self.recorder = pj.AudioMediaRecorder()
                    self.recorder.createRecorder(self.record_path)
                aud.startTransmit(self.recorder)
            emit(event="media", call=self.index, active=True)

    def hangup_now(self) -> None:
        if self.hangup_sent or self.disconnected:
            return
        self.hangup_sent = True
        prm = pj.CallOpParam()
        try:
            self.hangup(prm)
        except pj.Error as exc:  # already gone
            emit(event="error", call=self.index, where="hangup", info=exc.info())


def record_path(base: str | None, index: int, total: int) -> str | None:
    if not base:
        return None
    if total == 1:
        return base
    p = Path(base)
    return str(p.with_name(f"{p.stem}-{index}{p.suffix or '.wav'}"))


def run_calls(
    ep: pj.Endpoint, acc: pj.Account, tone: pj.ToneGenerator | None, args: argparse.Namespace
) -> int:
    """Make the calls and drive them to the end; deletes every Call it made."""
    calls: list[Caller] = []
    c: Caller | None = None  # loop variable; must not outlive the calls
    rc = 0
    try:
        for i in range(args.calls):
            call = Caller(acc, i, tone, record_path(args.record, i, args.calls))
            calls.append(call)
            del call
            calls[i].makeCall(args.uri, pj.CallOpParam(True))
            emit(event="calling", call=i, uri=args.uri)

        deadline = time.monotonic() + args.timeout
        while not all(c.disconnected for c in calls):
            ep.libHandleEvents(10)
            now = time.monotonic()
            for c in calls:
                if args.hangup_after is not None and now - c.started >= args.hangup_after:
                    c.hangup_now()
            if now > deadline:
                emit(event="timeout")
                rc = 2
                for c in calls:
                    c.hangup_now()
                # give the hangups a moment to go out
                end = time.monotonic() + 2.0
                while time.monotonic() < end and not all(c.disconnected for c in calls):
                    ep.libHandleEvents(10)
                break
        # let final ACKs / 200s be sent
        end = time.monotonic() + 0.3
        while time.monotonic() < end:
            ep.libHandleEvents(10)
        emit(event="done", calls=len(calls))
    finally:
        for c in calls:
            c.tone = None
            if c.recorder is not None:
                rec = c.recorder
                c.recorder = None
                del rec
        c = None  # drop the loop variable's reference to the last call
        while calls:
            call = calls.pop()
            del call
        gc.collect()
    return rc


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--uri", required=True, help="SIP URI to call")
    ap.add_argument("--calls", type=int, default=1, help="number of simultaneous calls")
    ap.add_argument(
        "--hangup-after",
        type=float,
        default=None,
        help="seconds after starting a call to hang it up (CANCEL if not answered yet)",
    )
    ap.add_argument(
        "--tone", type=float, default=None, help="send a sine tone of this frequency (Hz)"
    )
    ap.add_argument(
        "--record",
        default=None,
        help="record received audio to this WAV (NAME-i.wav for several calls)",
    )
    ap.add_argument("--timeout", type=float, default=30.0, help="give up after this many seconds")
    ap.add_argument("--log", default=None, help="pjsip log file (level 5)")
    args = ap.parse_args(argv)

    ep = pj.Endpoint()
    # pjlib prints a few log lines to stdout while it initialises, before the
    # log config below takes effect; keep stdout clean for the JSON events.
    sys.stdout.flush()
    saved_stdout = os.dup(1)
    os.dup2(2, 1)
    try:
        ep.libCreate()
    finally:
        os.dup2(saved_stdout, 1)
        os.close(saved_stdout)
    ep_cfg = pj.EpConfig()
    ep_cfg.uaConfig.threadCnt = 0
    ep_cfg.uaConfig.mainThreadOnly = True
    ep_cfg.uaConfig.maxCalls = max(4, args.calls)
    ep_cfg.uaConfig.userAgent = "sipgw-test-pjsua-caller"
    ep_cfg.logConfig.consoleLevel = 0
    if args.log:
        ep_cfg.logConfig.filename = args.log
        ep_cfg.logConfig.level = 5
    else:
        ep_cfg.logConfig.level = 0
    ep_cfg.medConfig.hasIoqueue = True
    ep.libInit(ep_cfg)
    ep.audDevManager().setNullDev()

    tcfg = pj.TransportConfig()
    tcfg.boundAddress = "127.0.0.1"
    tcfg.publicAddress = "127.0.0.1"
    tcfg.port = 0
    ep.transportCreate(pj.PJSIP_TRANSPORT_UDP, tcfg)
    ep.libStart()

    acc_cfg = pj.AccountConfig()
    acc_cfg.idUri = "sip:caller@127.0.0.1"
    acc_cfg.mediaConfig.transportConfig.boundAddress = "127.0.0.1"
    acc_cfg.mediaConfig.transportConfig.publicAddress = "127.0.0.1"
    acc_cfg.mediaConfig.transportConfig.port = 0  # let the OS choose RTP ports
    acc = pj.Account()
    acc.create(acc_cfg)

    tone: pj.ToneGenerator | None = None
    if args.tone:
        tone = pj.ToneGenerator()
        tone.createToneGenerator()
        desc = pj.ToneDesc()
        desc.freq1 = int(args.tone)
        desc.freq2 = 0
        desc.on_msec = 10000
        desc.off_msec = 0
        desc.volume = 0
        tones = pj.ToneDescVector()
        tones.append(desc)
        tone.play(tones, True)

    try:
        rc = run_calls(ep, acc, tone, args)
    finally:
        # Explicitly delete pjsua2 objects before libDestroy (the calls and
        # their recorders are already gone, see run_calls).
        if tone is not None:
            tone.stop()
            del tone
        acc.shutdown()
        del acc
        gc.collect()
        ep.libDestroy()
        del ep
    return rc


if __name__ == "__main__":
    sys.exit(main())
