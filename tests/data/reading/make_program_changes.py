"""Write program_changes.mid and its miditoolkit 1.0.1 reading (program_changes.json).

Not part of the test suite: run once with mido and miditoolkit==1.0.1 installed (in a separate
environment; the package depends on neither). The expected notes in the JSON are what the official
encoder's MIDI reader sees, and test_tokenizer.py checks museformer's reading against them.
"""

import json
from pathlib import Path

import mido
import miditoolkit

HERE = Path(__file__).parent


def on(t, p, v=80, ch=0):
    return t, mido.Message("note_on", note=p, velocity=v, channel=ch)


def off(t, p, ch=0, zero_velocity_on=False):
    if zero_velocity_on:
        return t, mido.Message("note_on", note=p, velocity=0, channel=ch)
    return t, mido.Message("note_off", note=p, velocity=0, channel=ch)


def pc(t, program, ch=0):
    return t, mido.Message("program_change", program=program, channel=ch)


# events of each track in file order: (absolute tick, message)
TRACKS = [
    [  # guitar on channel 0 changing program mid-song, as the real pop song of issue 17 does
        (0, mido.MetaMessage("track_name", name="guitar")),
        pc(0, 29), on(0, 60, 100), pc(240, 28), off(480, 60),  # change between on and off -> 28
        on(480, 64, 90), pc(480, 30), off(960, 64),  # change at the note-on's tick, after it -> 30
        pc(960, 29), on(960, 62, 70), pc(1440, 28), off(1440, 62), on(1440, 62, 60),  # change at
        off(1920, 62, zero_velocity_on=True),  # the note-off's tick, before it -> 28, 28
        on(1920, 67, 50), on(1920, 67, 40), pc(2400, 25), off(2400, 67), pc(2880, 29),  # same-pitch
        off(2880, 67),  # notes close first-in first-out: the first (v 50) ends at 2400 under 25
        on(2880, 69, 30), off(3360, 69), pc(3360, 28),  # change after the note-off -> 29
    ],
    [  # bass on channel 1 (program 32 -> 43 while a note sounds) and drums on channel 9
        pc(0, 32, ch=1), on(0, 36, 100, ch=1), on(0, 42, 90, ch=9), pc(0, 5, ch=9),
        off(240, 42, ch=9), pc(480, 43, ch=1), off(960, 36, ch=1), on(960, 38, 80, ch=1),
        off(1440, 38, ch=1),
    ],
]


def main() -> None:
    mf = mido.MidiFile(ticks_per_beat=480, type=1)
    for events in TRACKS:
        track = mido.MidiTrack()
        last = 0
        for tick, msg in events:
            track.append(msg.copy(time=tick - last))
            last = tick
        mf.tracks.append(track)
    mf.save(HERE / "program_changes.mid")
    m = miditoolkit.MidiFile(str(HERE / "program_changes.mid"))
    expected = [
        {"program": int(i.program), "is_drum": bool(i.is_drum),
         "notes": [[n.start, n.end, n.pitch, n.velocity] for n in i.notes]}
        for i in m.instruments
    ]
    (HERE / "program_changes.json").write_text(json.dumps(expected, indent=1) + "\n")


if __name__ == "__main__":
    main()
