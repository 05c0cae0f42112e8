from llm_gateway.cli import main

main()
