"""The admission gate on its own: places, the waiting room, the wait limit, clients that leave (asyncio, no server).
Through the real server: tests/test_load.py."""

from __future__ import annotations

import asyncio

import pytest

from chatbot.admission import Busy, Gate, Gone, Limits, TimedOut


def run(coroutine):
    return asyncio.run(asyncio.wait_for(coroutine, 30))


def test_places_are_handed_to_waiters_in_arrival_order_and_the_room_is_bounded():
    async def scenario():
        gate = Gate(Limits(concurrency=1, max_waiting=2, max_wait=10))
        await gate.enter()
        order: list[int] = []

        async def wait(number: int) -> None:
            await gate.enter()
            order.append(number)

        waiters = [asyncio.create_task(wait(n)) for n in (1, 2)]
        await asyncio.sleep(0)
        assert (gate.running, gate.waiting) == (1, 2)
        with pytest.raises(Busy):
            await gate.enter()  # at once: the waiting room is full
        gate.leave()
        await asyncio.sleep(0)
        gate.leave()
        await asyncio.gather(*waiters)
        assert order == [1, 2] and (gate.running, gate.waiting) == (1, 0)
        gate.leave()
        assert gate.running == 0

    run(scenario())


def test_a_waiter_past_max_wait_times_out_and_one_whose_client_left_is_gone():
    async def scenario():
        gate = Gate(Limits(concurrency=1, max_waiting=4, max_wait=0.05))
        await gate.enter()
        with pytest.raises(TimedOut):
            await gate.enter()
        client_left = asyncio.get_running_loop().create_future()
        waiter = asyncio.create_task(gate.enter(client_left))
        await asyncio.sleep(0)
        client_left.set_result(None)
        with pytest.raises(Gone):
            await waiter
        assert (gate.running, gate.waiting) == (1, 0), "neither kept a place in the queue"
        gate.leave()
        assert gate.running == 0
        await gate.enter()  # and the place is free again
        assert gate.running == 1

    run(scenario())


def test_a_place_handed_to_a_client_that_just_left_goes_to_the_next():
    async def scenario():
        gate = Gate(Limits(concurrency=1, max_waiting=4, max_wait=10))
        await gate.enter()
        client_left = asyncio.get_running_loop().create_future()
        leaving = asyncio.create_task(gate.enter(client_left))
        staying = asyncio.create_task(gate.enter())
        await asyncio.sleep(0)
        gate.leave()  # hands the place to the first waiter ...
        client_left.set_result(None)  # ... whose client leaves before it runs
        with pytest.raises(Gone):
            await leaving
        await staying
        assert (gate.running, gate.waiting) == (1, 0)

    run(scenario())
