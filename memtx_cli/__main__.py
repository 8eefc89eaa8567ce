from memtx_cli.cli.app import main

main()
