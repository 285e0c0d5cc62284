"""Printing generated text as it arrives, with timing (transformers' streamer protocol: put/end)."""

from __future__ import annotations

import sys
import time


class TimedTextStreamer:
    """Prints new text as tokens arrive and times them (transformers' streamer protocol: put/end)."""

    def __init__(self, tokenizer):
        self.tokenizer, self.tokens, self.printed, self.times = tokenizer, [], "", []
        self._prompt_seen = False

    def put(self, value) -> None:
        if not self._prompt_seen:
            self._prompt_seen = True
            self._start = time.perf_counter()
            return
        self.times.append(time.perf_counter())
        self.tokens.extend(value.reshape(-1).tolist())
        text = self.tokenizer.decode(self.tokens, skip_special_tokens=True)
        sys.stdout.write(text[len(self.printed):])
        sys.stdout.flush()
        self.printed = text

    def end(self) -> None:
        pass

    def summary(self) -> str:
        if len(self.times) < 2:
            return f"{len(self.times)} tokens"
        first = self.times[0] - self._start
        per_token = (self.times[-1] - self.times[0]) / (len(self.times) - 1)
        return (f"{len(self.times)} tokens; time to first token {first * 1000:.0f} ms; "
                f"{per_token * 1000:.1f} ms/token ({1 / per_token:.1f} tokens/s)")
