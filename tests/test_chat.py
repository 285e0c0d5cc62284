"""``stamen chat`` driven through a pseudo-terminal over the real model's 3-server swarm."""

from __future__ import annotations

import fcntl
import os
import pty
import re
import select
import subprocess
import sys
import termios
import time

import pytest
import torch

pytestmark = pytest.mark.swarm


class Terminal:
    """A child process on a pseudo-terminal that is its controlling terminal (so ^C is SIGINT)."""

    def __init__(self, args: list[str]):
        self.master, slave = pty.openpty()
        attrs = termios.tcgetattr(slave)
        attrs[3] &= ~termios.ECHO  # the test reads what the program writes, not what it types
        termios.tcsetattr(slave, termios.TCSANOW, attrs)

        def become_session_leader() -> None:
            os.setsid()
            fcntl.ioctl(0, termios.TIOCSCTTY, 0)

        self.proc = subprocess.Popen(args, stdin=slave, stdout=slave, stderr=slave, close_fds=True,
                                     preexec_fn=become_session_leader,
                                     env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
        os.close(slave)
        self.buffer = ""

    def expect(self, pattern: str, timeout: float = 120.0) -> re.Match:
        """Wait for ``pattern`` in the output; consumes the output up to the end of the match."""
        deadline = time.monotonic() + timeout
        regex = re.compile(pattern, re.S)
        while True:
            match = regex.search(self.buffer)
            if match:
                self.buffer = self.buffer[match.end():]
                return match
            left = deadline - time.monotonic()
            if left <= 0 or self.proc.poll() is not None:
                raise AssertionError(f"no {pattern!r} in the chat's output:\n{self.buffer[-3000:]}")
            ready, _, _ = select.select([self.master], [], [], min(left, 1.0))
            if ready:
                try:
                    self.buffer += os.read(self.master, 65536).decode(errors="replace").replace("\r\n", "\n")
                except OSError:  # the child closed the terminal
                    pass

    def send(self, text: str) -> None:
        os.write(self.master, text.encode())

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        os.close(self.master)


def local_turn(smol_local, messages: list[dict[str, str]], max_new_tokens: int) -> tuple[list[int], list[int], str]:
    model, tok = smol_local
    prompt = list(tok.apply_chat_template(messages, add_generation_prompt=True, return_dict=True)["input_ids"])
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), max_new_tokens=max_new_tokens, do_sample=False)
    new = out[0, len(prompt):].tolist()
    if tok.eos_token_id in new:
        new = new[: new.index(tok.eos_token_id) + 1]
    return prompt, new, tok.decode(new, skip_special_tokens=True)


STATS = r"\[(\d+) tokens[^\]]*?(\(stopped\))?; prompt: sent (\d+) new tokens to the servers, (\d+) reused"
MAX_NEW_TOKENS = 400
"""Room for answers: the two questions end (end of turn) after 8 tokens; the poem runs past 400
tokens without ending (transformers' greedy answer), so Ctrl-C lands while it is still being written
whatever the machine's speed."""


def test_chat_two_turns_send_only_new_tokens_and_ctrl_c_stops_an_answer(smol_swarm, smol_dir, smol_local):
    q1, q2 = "What is the capital of France?", "And of Germany?"
    ids1, new1, a1 = local_turn(smol_local, [{"role": "user", "content": q1}], MAX_NEW_TOKENS)
    history = [{"role": "user", "content": q1}, {"role": "assistant", "content": a1}, {"role": "user", "content": q2}]
    ids2, new2, a2 = local_turn(smol_local, history, MAX_NEW_TOKENS)
    assert ids2[: len(ids1) + len(new1)] == ids1 + new1  # the template re-creates turn 1 token for token
    assert new1[-1] == new2[-1] == smol_local[1].eos_token_id  # both answers end by themselves

    term = Terminal([sys.executable, "-m", "stamen", "chat", smol_dir, "--initial-peers", *smol_swarm.initial_peers,
                     "--max-new-tokens", str(MAX_NEW_TOKENS)])
    try:
        term.expect(r"you> ")
        term.send(q1 + "\n")
        answer = term.expect(r"bot> (.*?)\n" + STATS)
        assert answer.group(1) == a1
        assert int(answer.group(2)) == len(new1)
        assert int(answer.group(4)) == len(ids1)  # the first turn sends the whole prompt

        term.expect(r"you> ")
        term.send(q2 + "\n")
        answer = term.expect(r"bot> (.*?)\n" + STATS)
        assert answer.group(1) == a2
        # the servers already hold turn 1 except its final end-of-turn token, which was never sent
        assert int(answer.group(4)) == len(ids2) - (len(ids1) + len(new1) - 1)
        assert int(answer.group(5)) == len(ids1) + len(new1) - 1

        term.expect(r"you> ")
        term.send("Write a long poem about the sea, with many verses.\n")
        term.expect(r"bot> \S+ \S+ \S+")  # a few words have arrived
        term.send("\x03")  # Ctrl-C: stop this answer, keep the chat
        stopped = term.expect(STATS)
        assert stopped.group(2) == "(stopped)" and int(stopped.group(1)) < MAX_NEW_TOKENS

        term.expect(r"you> ")  # still chatting
        term.send(q1 + "\n")
        term.expect(r"bot> .*?\n" + STATS)
        term.expect(r"you> ")
        term.send("/exit\n")
        assert term.proc.wait(timeout=60) == 0
    finally:
        term.close()
