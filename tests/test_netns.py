"""Network conditions for benchmarks: the latency relay (on 127.0.0.1) and, as root, test hosts in
network namespaces with tc tbf limits, a real server in one serving a real client in another."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time

import pytest
import torch

from stamen.testing.latency import Relay
from stamen.testing.netns import Topology, entered, list_namespaces, namespaces_unavailable

NO_NETNS = namespaces_unavailable()
needs_netns = pytest.mark.skipif(NO_NETNS is not None, reason=f"network namespaces unavailable: {NO_NETNS}")


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_relay_delays_each_direction_in_order_without_serialising_messages():
    async def main():
        async def echo(reader, writer):
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
            writer.close()

        server = await asyncio.start_server(echo, "127.0.0.1", 0)
        relay = Relay(("127.0.0.1", 0), server.sockets[0].getsockname()[:2], delay=0.040)
        host, port = await relay.start()
        reader, writer = await asyncio.open_connection(host, port)
        payload = b"".join(i.to_bytes(4, "big") * 256 for i in range(50))  # 50 messages of 1 KiB
        start = time.perf_counter()
        for i in range(50):
            writer.write(payload[i * 1024:(i + 1) * 1024])
            await writer.drain()
            await asyncio.sleep(0.002)  # spread over ~100 ms: pipelined, not one chunk
        first = await reader.readexactly(1024)
        first_at = time.perf_counter() - start
        rest = await reader.readexactly(len(payload) - 1024)
        total = time.perf_counter() - start
        writer.close()
        await relay.close()
        server.close()
        return first + rest, payload, first_at, total

    echoed, payload, first_at, total = asyncio.run(main())
    assert echoed == payload  # every byte, in order
    # lower bounds are physics (the relay holds every byte 40 ms each way); upper bounds leave room
    # for a loaded machine yet stay far below what serialising the delay would take
    assert first_at >= 0.075  # 40 ms each way
    assert total - first_at < 1.0  # the rest streamed behind the first: 50 messages × 80 ms would be 4 s


def test_injected_rtt_adds_to_a_hivemind_stream_round_trip():
    from hivemind.p2p import P2P, P2PContext
    from hivemind.proto import runtime_pb2

    async def main():
        server_port = _free_port()
        relay = Relay(("127.0.0.1", 0), ("127.0.0.1", server_port))
        _, relay_port = await relay.start()
        a = await P2P.create(host_maddrs=[f"/ip4/127.0.0.1/tcp/{server_port}"],
                             announce_maddrs=[f"/ip4/127.0.0.1/tcp/{relay_port}"])

        async def pong(requests, context: P2PContext):
            async for request in requests:
                yield request

        await a.add_protobuf_handler("pong", pong, runtime_pb2.ExpertRequest, stream_input=True, stream_output=True)
        b = await P2P.create(initial_peers=[f"/ip4/127.0.0.1/tcp/{relay_port}/p2p/{a.peer_id}"])
        queue: asyncio.Queue = asyncio.Queue()

        async def requests():
            while (item := await queue.get()) is not None:
                yield item

        replies = await b.iterate_protobuf_handler(a.peer_id, "pong", requests(), runtime_pb2.ExpertRequest)
        message = runtime_pb2.ExpertRequest(uid="x" * 32, tensors=[runtime_pb2.Tensor(buffer=b"\0" * 4096)])

        async def round_trips(n: int) -> float:
            times = []
            for _ in range(n):
                start = time.perf_counter()
                await queue.put(message)
                await asyncio.wait_for(replies.__anext__(), 10)
                times.append(time.perf_counter() - start)
            return 1000 * min(times)  # the least disturbed by other load on the machine

        try:
            await round_trips(3)  # warm-up
            base = await round_trips(10)
            relay.delay = 0.030  # changed on the open connection: RTT + 60 ms
            await round_trips(1)
            delayed = await round_trips(10)
            relay.delay = 0.0
            await round_trips(1)
            back = await round_trips(10)
            await queue.put(None)
        finally:
            await b.shutdown()
            await a.shutdown()
            await relay.close()
        return base, delayed, back, relay.connections

    base, delayed, back, connections = asyncio.run(main())
    assert connections >= 1  # the stream went through the relay
    # the fastest of 10 round trips: at least the injected 60 ms more (physics), at most about
    # twice that (load on the machine adds to single round trips, rarely to all 10)
    assert 58 <= delayed - base <= 120, (base, delayed)
    assert back < base + 30, (base, back)


@needs_netns
def test_tbf_limits_a_transfer_between_namespaces_and_teardown_removes_them():
    receive = ("import socket, time\n"
               "s = socket.socket(); s.bind(('10.77.0.2', 5001)); s.listen(); print('up', flush=True)\n"
               "c, _ = s.accept(); n = 0; t = time.perf_counter()\n"
               "while b := c.recv(1 << 20): n += len(b)\n"
               "print(n * 8 / (time.perf_counter() - t) / 1e6)")
    send = "import socket; s = socket.create_connection(('10.77.0.2', 5001)); s.sendall(b'x' * (3 << 20)); s.close()"
    topo = Topology(["a", "b"])
    names = [topo.ns("a"), topo.ns("b"), topo.bridge_ns]
    try:
        assert set(names) <= set(list_namespaces())
        topo.set_rate("40mbit")
        receiver = subprocess.Popen([*topo.exec_prefix("b"), sys.executable, "-c", receive], stdout=subprocess.PIPE,
                                    text=True)
        assert receiver.stdout.readline().strip() == "up"
        subprocess.run([*topo.exec_prefix("a"), sys.executable, "-c", send], check=True, timeout=30)
        mbits = float(receiver.stdout.read())
        receiver.wait(10)
    finally:
        topo.teardown()
    assert 25 < mbits <= 42, mbits  # 3 MiB at 40 Mbit/s: ~0.6 s
    assert not set(names) & set(list_namespaces())


@needs_netns
def test_a_server_in_one_namespace_serves_a_client_in_another(tmp_path):
    from stamen.bench.network_swarm import NetSwarm
    from stamen.client.model import AutoDistributedModelForCausalLM
    from stamen.models import BlockConfig, load_config, load_span, open_checkpoint
    from stamen.testing.models import PRESETS, save_random_llama
    from stamen.types import Span

    model = str(save_random_llama(tmp_path / "tiny", PRESETS["tiny"], with_tokenizer=False))
    config = BlockConfig.from_hf(load_config(model))
    local = load_span(open_checkpoint(model), config, Span(0, config.num_blocks), torch.float32, progress=False)
    hidden = torch.randn(2, 16, config.hidden_size, generator=torch.Generator().manual_seed(0))
    with Topology(["client", "s0"]) as topo:
        topo.set_rate("100mbit")
        with NetSwarm(tmp_path / "logs", topo) as swarm:
            swarm.start_bootstrap()
            swarm.add_relayed_server(model, Span(0, config.num_blocks), 0)
            assert swarm.initial_peers[0].startswith("/ip4/10.77.0.1/")
            with entered(topo.ns("client")):
                client = None
                try:
                    swarm.wait_online("tiny", config.num_blocks, timeout=60)
                    client = AutoDistributedModelForCausalLM.from_pretrained(model, initial_peers=swarm.initial_peers)
                    assert len(client.swarm.servers()) == 1
                    with torch.no_grad():
                        remote = client.run_blocks(hidden)
                finally:
                    if client is not None:
                        client.shutdown()
                    swarm.stop()
            assert swarm.relays == []
    torch.testing.assert_close(remote, local(hidden), rtol=1e-5, atol=1e-5)
    assert not [n for n in list_namespaces() if n.startswith(topo.tag)]
