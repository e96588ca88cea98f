"""empath.smtp"""
