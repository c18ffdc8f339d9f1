module github.com/nkv/nkv/clients/go

go 1.19
