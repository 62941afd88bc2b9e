"""An MCP server run as a stdio child by the official SDK's client, as MCP
hosts run them: shared by the tests of `forkd mcp` and of the reference's
server."""

from __future__ import annotations

import asyncio
import contextlib
import tempfile
from typing import Any, AsyncIterator, Dict, List

from mcp import ClientSession
from mcp.client.stdio import StdioServerParameters, stdio_client


@contextlib.asynccontextmanager
async def stdio_session(command: str, args: List[str], env: Dict[str, str], label: str) -> AsyncIterator[ClientSession]:
    """An initialized session with `command args`, configured only through
    `env`; the server must call itself "forkd". Its stderr is printed when
    the session ends in an error."""
    params = StdioServerParameters(command=command, args=args, env=env)
    with tempfile.TemporaryFile("w+") as errlog:
        try:
            async with stdio_client(params, errlog=errlog) as (read, write):
                async with ClientSession(read, write) as session:
                    init = await session.initialize()
                    assert init.server_info.name == "forkd"
                    yield session
        except BaseException:
            errlog.seek(0)
            print(f"{label} stderr:\n" + errlog.read())
            raise


def run_bounded(coro: Any, timeout: float) -> Any:
    """Runs `coro` to its end or fails after `timeout` seconds, so a hung
    server fails the test instead of the run."""

    async def bounded() -> Any:
        return await asyncio.wait_for(coro, timeout)

    return asyncio.run(bounded())


def text_of(result: Any) -> str:
    """The first text block of a tool result."""
    assert result.content, result
    return str(result.content[0].text)
