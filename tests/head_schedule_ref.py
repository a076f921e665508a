"""An independent transcription of the public HEAD's training schedule (modded-nanogpt's repo-root
train_gpt.py with records up to #89 merged: 1270 scheduled + 15 extension steps), step by step, from
its TrainingStage list, TrainingSchedule, get_muon_momentum and TrainingManager, in their own terms,
for the tests to hold train_gpt's `--preset=head` schedule against.

Nothing here is imported from train_gpt. HEAD lists a stage's windows as (short, long); the
functions here answer (long, short), in blocks of 128 tokens, as train_gpt's Schedule does. The
schedule length is a parameter, so other lengths can be checked with HEAD's rules too.
"""
SCHEDULED, EXTENSION = 1270, 15
TOTAL = SCHEDULED + EXTENSION
BLOCK_TOKENS = 128
COOLDOWN_FRAC, LR_FLOOR = 0.60, 0.15
MOMENTUM_MIN, MOMENTUM_MAX, MOMENTUM_WARMUP, MOMENTUM_COOLDOWN = 0.85, 0.95, 300, 50
FINAL_LONG = 20  # the final validation's long window; the short one stays the extension's
UNTIE_STAGE = 2  # the embedding unties at this stage's start (after the odd step there, on which Adam steps)
ADAM_PARITY = 1  # Adam steps on odd steps only

# The three thirds, then the extension stage (whose lr multiplier HEAD never reads: the cooldown
# has reached its floor by then). Per stage: lr multiplier, global batch tokens, longest piece of a
# document, (short, long) windows in blocks, MTP weights at its start and its end, prefix-loss
# weight at its start and its end. Weights move linearly across a stage's steps.
STAGES = [
    dict(lr=1.0, batch=8 * 2048 * 8, seq=896, windows=(1, 3),
         mtp=([1.0, 0.5, 0.25], [1.0, 0.5, 0.0]), prefix=(0.25, 0.25)),
    dict(lr=1.52, batch=16 * 2048 * 8, seq=2048, windows=(3, 7),
         mtp=([1.0, 0.5], [1.0, 0.0]), prefix=(0.25, 0.0)),
    dict(lr=1.73, batch=24 * 2048 * 8, seq=2048, windows=(5, 11),
         mtp=([1.0], [1.0]), prefix=(0.0, 0.0)),
    dict(lr=1.0, batch=24 * 2048 * 8, seq=2048, windows=(6, 13),
         mtp=([1.0], [1.0]), prefix=(0.0, 0.0)),
]
THIRD = 1 / 3  # each scheduled stage's share of the scheduled steps


def boundaries(scheduled=SCHEDULED, extension=EXTENSION):
    """[(start, end)] per stage: a third ends at the running sum of the shares times the scheduled
    steps, rounded to the nearest step; the extension follows."""
    ends, share = [0], 0.0
    for _ in range(3):
        share += THIRD
        ends.append(round(share * scheduled))
    assert ends[-1] == scheduled
    ends.append(scheduled + extension)
    return list(zip(ends[:-1], ends[1:]))


def lookup(step, scheduled=SCHEDULED, extension=EXTENSION):
    """(stage index, fraction of the way through it)."""
    for index, (start, end) in enumerate(boundaries(scheduled, extension)):
        if step < end:
            return index, (step - start) / (end - start)
    return len(STAGES) - 1, 1.0


def lr_mult(step, scheduled=SCHEDULED, extension=EXTENSION):
    stage, _ = lookup(step, scheduled, extension)
    peak = STAGES[stage]["lr"]
    cooldown_start = int(scheduled * (1 - COOLDOWN_FRAC))
    if step < cooldown_start:
        return peak
    t = min(1.0, (step - cooldown_start) / (scheduled - cooldown_start))
    return peak * (1 - t) + LR_FLOOR * t


def momentum(step, scheduled=SCHEDULED, extension=EXTENSION):
    cooldown_start = scheduled + extension - MOMENTUM_COOLDOWN
    if step < MOMENTUM_WARMUP:
        return MOMENTUM_MIN + step / MOMENTUM_WARMUP * (MOMENTUM_MAX - MOMENTUM_MIN)
    if step > cooldown_start:
        return MOMENTUM_MAX - (step - cooldown_start) / MOMENTUM_COOLDOWN * (MOMENTUM_MAX - MOMENTUM_MIN)
    return MOMENTUM_MAX


def mtp_weights(step, scheduled=SCHEDULED, extension=EXTENSION):
    stage, t = lookup(step, scheduled, extension)
    first, last = STAGES[stage]["mtp"]
    return [a + (b - a) * t for a, b in zip(first, last)]


def prefix_weight(step, scheduled=SCHEDULED, extension=EXTENSION):
    stage, t = lookup(step, scheduled, extension)
    first, last = STAGES[stage]["prefix"]
    return first + (last - first) * t


def batch_tokens(step, scheduled=SCHEDULED, extension=EXTENSION):
    return STAGES[lookup(step, scheduled, extension)[0]]["batch"]


def max_seq_len(step, scheduled=SCHEDULED, extension=EXTENSION):
    return STAGES[lookup(step, scheduled, extension)[0]]["seq"]


def window_blocks(step, scheduled=SCHEDULED, extension=EXTENSION):
    """(long, short) in blocks."""
    short, long = STAGES[lookup(step, scheduled, extension)[0]]["windows"]
    return long, short


def untie_step(scheduled=SCHEDULED, extension=EXTENSION):
    """HEAD copies the head into the embedding after the optimizers of its split step (the untie
    stage's first step, made odd so that Adam steps on it); the next step's forward is untied."""
    split = boundaries(scheduled, extension)[UNTIE_STAGE][0] | ADAM_PARITY
    return split + 1


def final_window_blocks(scheduled=SCHEDULED, extension=EXTENSION):
    """(long, short) of the final validation: the long window set to 20 blocks, the short as the last step's."""
    return FINAL_LONG, window_blocks(scheduled + extension - 1, scheduled, extension)[1]


def total_steps(scheduled=SCHEDULED, extension=EXTENSION):
    return scheduled + extension
