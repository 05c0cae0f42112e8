from llm_gateway.workers.cli import main

main()
