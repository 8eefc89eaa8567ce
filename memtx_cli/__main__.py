from memtx_cli.cli import main

main()
