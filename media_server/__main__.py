from media_server.cli.main import main

main()
