"""Compare museformer's MIDI reading with miditoolkit 1.0.1 on random files (not a test).

Needs mido and miditoolkit==1.0.1 (a separate environment; the package depends on neither).
Usage: PYTHONPATH=src python tests/data/reading/compare_miditoolkit.py FILES LATE
(LATE=1: program changes anywhere in the song; 0: only at tick 0, in random order with note-ons).
"""
import sys
import random, mido, miditoolkit, numpy as np, symusic, io
from museformer import midi_programs as mp
MID = int(sys.argv[2])


def rand_file(seed):
    r = random.Random(seed)
    mf = mido.MidiFile(ticks_per_beat=r.choice([96, 480]), type=1)
    for t in range(r.randint(1, 3)):
        tr = mido.MidiTrack(); mf.tracks.append(tr)
        ev = []
        if r.random() < .5: ev.append((0, 0, mido.MetaMessage('track_name', name='trk%d' % t)))
        chans = r.sample([0, 1, 2, 9], r.randint(1, 2))
        for ch in chans:
            if r.random() < .7: ev.append((0, r.random(), mido.Message('program_change', program=r.choice([0, 25, 28, 29, 30, 32, 43]), channel=ch)))
            for k in range(r.randint(0, 4) * MID):
                ev.append((r.randrange(0, 4000), r.random(), mido.Message('program_change', program=r.choice([0, 25, 28, 29, 30]), channel=ch)))
            for k in range(r.randint(1, 30)):
                s = r.randrange(0, 3000) // 60 * 60; d = r.choice([0, 60, 120, 240, 480, 1000])
                p = r.choice([60, 62, 64, 36])
                ev.append((s, r.random(), mido.Message('note_on', note=p, velocity=r.randint(1, 127), channel=ch)))
                ev.append((s + d, r.random(), mido.Message('note_off', note=p, velocity=0, channel=ch) if r.random() < .5 else mido.Message('note_on', note=p, velocity=0, channel=ch)))
            if r.random() < .3: ev.append((r.randrange(0, 3000), r.random(), mido.MetaMessage('lyrics', text='é')))
            if r.random() < .3: ev.append((r.randrange(0, 3000), r.random(), mido.Message('control_change', control=7, value=100, channel=ch)))
        ev.sort(key=lambda e: (e[0], e[1]))
        t0 = 0
        for tick, _, m in ev:
            tr.append(m.copy(time=tick - t0)); t0 = tick
    b = io.BytesIO(); mf.save(file=b); return b.getvalue()
def mtk_notes(data):
    m = miditoolkit.MidiFile(file=io.BytesIO(data))
    return [(int(i.program), bool(i.is_drum), [(n.start, n.end, n.pitch, n.velocity) for n in i.notes]) for i in m.instruments]
def ours(raw):
    out = {}
    for s, e, p, v, pr, d, g in zip(raw.start, raw.end, raw.pitch, raw.velocity, raw.program, raw.is_drum, raw.group):
        out.setdefault(int(g), (int(pr), bool(d), []))[2].append((int(s), int(e), int(p), int(v)))
    return [out[g] for g in sorted(out)]
def sym(data):
    s = symusic.Score.from_midi(data)
    return sorted((t.program, t.is_drum, sorted((n.time, n.end, n.pitch, n.velocity) for n in t.notes)) for t in s.tracks if len(t.notes))
n_diff = n_fast = n_fast_bad = n_sym_bad = 0
N = int(sys.argv[1]); MID = int(sys.argv[2])
for seed in range(N):
    data = rand_file(seed)
    want = mtk_notes(data)
    got = ours(mp.read_notes(data))
    if got != want:
        n_diff += 1
        if n_diff < 3: print('DIFF', seed, want, got)
    srt = sorted((p, d, sorted(ns)) for p, d, ns in want if ns)
    if not mp.may_differ(data):
        n_fast += 1
        if sym(data) != srt: n_fast_bad += 1; print('FASTBAD', seed)
    # merge sym tracks of same (program, drum) for comparison? tracks are per (track, channel, program)
    if sym(data) != srt: n_sym_bad += 1
print(f'{N} files: read_notes != miditoolkit: {n_diff}; fast path used {n_fast}, wrong {n_fast_bad}; symusic alone != miditoolkit: {n_sym_bad}')
