"""`python -m runtime_agent --config PATH`."""

from __future__ import annotations

import argparse
import logging
import sys

from runtime_agent.agent import Agent
from runtime_agent.identity import AgentConfig


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="runtime_agent", description="Cumulus node agent")
    parser.add_argument("--config", required=True, help="path of agent.json")
    parser.add_argument("--log-level", default="INFO")
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s %(message)s",
        stream=sys.stderr,
    )
    agent = Agent(AgentConfig.load(args.config))
    agent.install_signal_handlers()
    return agent.run()


if __name__ == "__main__":
    sys.exit(main())
