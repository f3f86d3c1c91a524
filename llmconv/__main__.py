from llmconv.cli.app import main

main()
